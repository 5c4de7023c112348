//! MSI-X and MSI vectors on the simulated backend: commit batching, and a property test that
//! no trigger is ever lost or multiplied whatever the guest does to the table.

use std::sync::Arc;

use proptest::prelude::*;
use vmirq::msix::{MsiCapability, MsiVectors, MsixTable, MsixVectors};
use vmirq::{Config, Interrupts, IrqchipMode, SimBackend, X86Msi};

const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

fn vm() -> (Arc<SimBackend>, Arc<Interrupts>) {
    let sim = SimBackend::new(1, IrqchipMode::Split { ioapic_pins: 24 });
    let irq = Interrupts::new(sim.clone(), Config::default()).unwrap();
    (sim, irq)
}

fn program(vectors: &MsixVectors, v: u16, vector: u8, masked: bool) {
    let msg = X86Msi::fixed(0, vector).encode().unwrap();
    let off = u64::from(v) * 16;
    vectors.bar_write(off, &msg.address_lo().to_le_bytes());
    vectors.bar_write(off + 8, &msg.data.to_le_bytes());
    vectors.bar_write(off + 12, &u32::from(masked).to_le_bytes());
}

#[test]
fn lifting_the_function_mask_over_2048_vectors_is_one_route_commit() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(2048)).unwrap();
    vectors.write_message_control(ENABLE | FUNCTION_MASK);
    for v in 0..2048 {
        program(&vectors, v, 0x20 + (v % 200) as u8, false);
    }
    let before = sim.commits();
    assert!(vectors.write_message_control(ENABLE).is_empty());
    assert_eq!(sim.commits() - before, 1);
    assert_eq!(vectors.routed_vectors(), 2048);
    // Unmasking one more vector costs one commit and leaves the others alone.
    let before = sim.commits();
    vectors.write_message_control(ENABLE | FUNCTION_MASK);
    vectors.write_message_control(ENABLE);
    assert_eq!(
        sim.commits(),
        before,
        "mask/unmask of routed vectors re-routes nothing"
    );
}

#[test]
fn a_batch_of_table_writes_is_one_route_commit() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(64)).unwrap();
    vectors.write_message_control(ENABLE);
    let msg = X86Msi::fixed(0, 0x40).encode().unwrap();
    let entries: Vec<[u8; 16]> = (0..64)
        .map(|_| {
            let mut e = [0u8; 16];
            e[0..4].copy_from_slice(&msg.address_lo().to_le_bytes());
            e[8..12].copy_from_slice(&msg.data.to_le_bytes());
            e
        })
        .collect();
    let writes: Vec<(u64, &[u8])> = entries
        .iter()
        .enumerate()
        .flat_map(|(v, e)| [(v as u64 * 16, &e[0..8]), (v as u64 * 16 + 8, &e[8..16])])
        .collect();
    let before = sim.commits();
    assert!(vectors.bar_write_batch(&writes).is_empty());
    assert_eq!(sim.commits() - before, 1);
    assert_eq!(vectors.routed_vectors(), 64);
}

#[test]
fn msi_vectors_carry_their_index_in_the_data_low_bits() {
    let (sim, irq) = vm();
    let msi = MsiVectors::new(irq, MsiCapability::new(4, true, true)).unwrap();
    let msg = X86Msi::fixed(0, 0x50).encode().unwrap();
    // 64-bit, per-vector mask: address lo @4, hi @8, data @0xC, mask @0x10.
    msi.update(|c, fx| {
        c.config_write(0x04, &msg.address_lo().to_le_bytes(), fx);
        c.config_write(0x08, &0u32.to_le_bytes(), fx);
        c.config_write(0x0C, &(msg.data as u16).to_le_bytes(), fx);
        // Enable with 4 vectors (MME = 2).
        c.config_write(0x02, &(1u16 | 2 << 4).to_le_bytes(), fx);
    });
    assert_eq!(msi.routed_vectors(), 4);
    for v in 0..4u16 {
        msi.fire(v).unwrap();
    }
    sim.run_until_idle();
    for v in 0..4u8 {
        assert_eq!(sim.count(0, 0x50 + v), 1, "vector {v}");
    }
    // Per-vector mask latches; unmask delivers once.
    msi.update(|c, fx| c.config_write(0x10, &1u32.to_le_bytes(), fx));
    msi.fire(0).unwrap();
    msi.fire(0).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x50), 1);
    msi.update(|c, fx| c.config_write(0x10, &0u32.to_le_bytes(), fx));
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x50), 2);
}

#[derive(Clone, Debug)]
enum Op {
    Fire(u16),
    EntryMask(u16, bool),
    FunctionMask(bool),
    Enable(bool),
    ReadPba,
    Pump,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..8u16).prop_map(Op::Fire),
        2 => (0..8u16, any::<bool>()).prop_map(|(v, m)| Op::EntryMask(v, m)),
        1 => any::<bool>().prop_map(Op::FunctionMask),
        1 => any::<bool>().prop_map(Op::Enable),
        1 => Just(Op::ReadPba),
        2 => Just(Op::Pump),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the guest does, a trigger is delivered at most once per trigger, nothing is
    /// delivered while its vector is masked (entry or function mask, or MSI-X disabled), and
    /// every vector triggered since its last delivery is delivered once it is deliverable again.
    #[test]
    fn no_trigger_is_lost_or_multiplied(ops in proptest::collection::vec(op(), 1..120)) {
        let (sim, irq) = vm();
        let vectors = MsixVectors::new(irq, MsixTable::new(8)).unwrap();
        for v in 0..8 {
            program(&vectors, v, 0x30 + v as u8, true);
        }
        let mut masked = [true; 8];
        let (mut fmask, mut enabled) = (false, false);
        let mut fired = [0u64; 8];
        let mut owed = [false; 8];
        let mut seen = [0u64; 8];
        let control = |e: bool, f: bool| (u16::from(e) << 15) | (u16::from(f) << 14);
        for op in ops {
            match op {
                Op::Fire(v) => {
                    vectors.fire(v).unwrap();
                    fired[usize::from(v)] += 1;
                    owed[usize::from(v)] = true;
                }
                Op::EntryMask(v, m) => {
                    vectors.bar_write(u64::from(v) * 16 + 12, &u32::from(m).to_le_bytes());
                    masked[usize::from(v)] = m;
                }
                Op::FunctionMask(f) => {
                    fmask = f;
                    vectors.write_message_control(control(enabled, fmask));
                }
                Op::Enable(e) => {
                    enabled = e;
                    vectors.write_message_control(control(enabled, fmask));
                }
                Op::ReadPba => {
                    let mut d = [0u8; 8];
                    vectors.bar_read(vectors.pba_offset(), &mut d);
                }
                Op::Pump => {
                    sim.run_until_idle();
                }
            }
            sim.run_until_idle();
            for v in 0..8 {
                let c = sim.count(0, 0x30 + v as u8);
                // Every trigger made before this step was injected and taken by the pump
                // above, so a delivery now is one made under the current masks.
                let deliverable = enabled && !fmask && !masked[v];
                prop_assert!(
                    deliverable || c == seen[v],
                    "vector {v} delivered while masked (entry {}, function {fmask}, enabled {enabled})",
                    masked[v]
                );
                if c > seen[v] {
                    owed[v] = false;
                    seen[v] = c;
                }
                prop_assert!(c <= fired[v], "vector {v}: {c} deliveries from {} triggers", fired[v]);
            }
        }
        // Make everything deliverable: every owed vector arrives.
        for v in 0..8u64 {
            vectors.bar_write(v * 16 + 12, &0u32.to_le_bytes());
        }
        vectors.write_message_control(ENABLE);
        sim.run_until_idle();
        for v in 0..8 {
            let c = sim.count(0, 0x30 + v as u8);
            prop_assert!(c <= fired[v]);
            prop_assert!(!owed[v] || c > seen[v], "vector {v} was triggered and never delivered");
        }
    }
}

#[test]
fn bar_accesses_anywhere_never_panic() {
    let (_sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(2048)).unwrap();
    vectors.write_message_control(ENABLE);
    for offset in [0, 7, 0x7FF8, 0x8000, 0x8008, 0x8100, u64::MAX - 8, u64::MAX] {
        for len in [1usize, 2, 4, 8] {
            let mut d = vec![0u8; len];
            vectors.bar_read(offset, &mut d);
            vectors.bar_write(offset, &d);
        }
    }
}

#[test]
fn the_table_and_pba_sit_where_the_device_declares_them() {
    use vmirq::msix::{MsixError, MsixLayout};
    let (sim, irq) = vm();
    // Overlapping structures are refused.
    let overlap = MsixLayout { table: 0, pba: 8 };
    assert!(matches!(
        MsixVectors::with_layout(irq.clone(), MsixTable::new(4), overlap),
        Err(MsixError::Layout { table: 0, pba: 8 })
    ));
    // PBA first, table after it.
    let layout = MsixLayout {
        table: 0x800,
        pba: 0,
    };
    let vectors = MsixVectors::with_layout(irq, MsixTable::new(4), layout).unwrap();
    assert_eq!(vectors.layout(), layout);
    assert_eq!(vectors.pba_offset(), 0);
    vectors.write_message_control(ENABLE);
    let msg = X86Msi::fixed(0, 0x41).encode().unwrap();
    let entry = 0x800 + 16;
    vectors.bar_write(entry, &msg.address_lo().to_le_bytes());
    vectors.bar_write(entry + 8, &msg.data.to_le_bytes());
    // A write where the default layout's table would be lands nowhere.
    vectors.bar_write(16 + 12, &0u32.to_le_bytes());
    assert_eq!(
        vectors.routed_vectors(),
        0,
        "a write outside the table routed a vector"
    );
    let mut data = [0u8; 4];
    vectors.bar_read(entry + 8, &mut data);
    assert_eq!(
        u32::from_le_bytes(data),
        msg.data,
        "the table reads back at its offset"
    );
    // Vector 1 fires while masked: its pending bit shows in the PBA at offset 0.
    vectors.fire(1).unwrap();
    let mut pba = [0u8; 8];
    vectors.bar_read(0, &mut pba);
    assert_eq!(u64::from_le_bytes(pba), 1 << 1);
    // Unmasked at its declared offset: routed, and the pending interrupt delivered once.
    vectors.bar_write(entry + 12, &0u32.to_le_bytes());
    assert_eq!(vectors.routed_vectors(), 1);
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x41), 1);
}

// Regression tests for MSI-X bugs a fuzzer found (issue 9): each drives the guest-visible
// sequence and checks delivery on the simulated vCPU.

fn write_entry(vectors: &MsixVectors, v: u16, address_lo: u32, data: u32, masked: bool) {
    let off = u64::from(v) * 16;
    vectors.bar_write(off, &address_lo.to_le_bytes());
    vectors.bar_write(off + 8, &data.to_le_bytes());
    vectors.bar_write(off + 12, &u32::from(masked).to_le_bytes());
}

fn pba(vectors: &MsixVectors) -> u64 {
    let mut data = [0u8; 8];
    vectors.bar_read(vectors.pba_offset(), &mut data);
    u64::from_le_bytes(data)
}

const NOT_AN_INTERRUPT: u32 = 0x1234_0000;

#[test]
fn a_vector_given_a_valid_message_while_unmasked_delivers() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    let msg = X86Msi::fixed(0, 0x42).encode().unwrap();
    write_entry(&vectors, 0, NOT_AN_INTERRUPT, msg.data, false);
    assert_eq!(vectors.routed_vectors(), 0);
    // Still unmasked, the guest fixes the address: route and irqfd, no re-mask needed.
    vectors.bar_write(0, &msg.address_lo().to_le_bytes());
    assert_eq!(vectors.routed_vectors(), 1);
    vectors.fire(0).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x42), 1, "the fire parked in the eventfd");
}

#[test]
fn an_invalid_message_never_makes_an_interrupt_nobody_raised() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    let msg = X86Msi::fixed(0, 0x43).encode().unwrap();
    write_entry(&vectors, 0, NOT_AN_INTERRUPT, msg.data, false);
    assert_eq!(pba(&vectors), 0, "nothing fired, nothing pending");
    write_entry(&vectors, 0, msg.address_lo(), msg.data, true);
    vectors.bar_write(12, &0u32.to_le_bytes());
    sim.run_until_idle();
    assert_eq!(
        sim.count(0, 0x43),
        0,
        "a phantom interrupt at the valid unmask"
    );
    // A fire while the message was invalid is kept, and delivered once it is valid.
    write_entry(&vectors, 1, NOT_AN_INTERRUPT, msg.data, false);
    vectors.fire(1).unwrap();
    assert_eq!(pba(&vectors), 1 << 1);
    vectors.bar_write(16, &msg.address_lo().to_le_bytes());
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x43), 1);
    assert_eq!(pba(&vectors), 0);
}

#[test]
fn a_function_level_reset_forgets_the_old_lifes_fires() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    let msg = X86Msi::fixed(0, 0x44).encode().unwrap();
    write_entry(&vectors, 2, msg.address_lo(), msg.data, true);
    vectors.fire(2).unwrap();
    assert_eq!(
        pba(&vectors),
        1 << 2,
        "the path is live: the masked fire is pending"
    );
    vectors.fire(2).unwrap();
    let (_, events) = vectors.update(|t, fx| t.reset(fx));
    assert!(events.is_empty());
    assert_eq!(pba(&vectors), 0, "vectors pending after reset");
    vectors.write_message_control(ENABLE);
    write_entry(&vectors, 2, msg.address_lo(), msg.data, false);
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x44), 0, "the old life's fire was delivered");
    vectors.fire(2).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x44), 1);
}

#[test]
fn a_refused_message_change_is_reported_and_never_delivers_the_old_message() {
    use vmirq::msix::MsixEvent;
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    let (old, new) = (
        X86Msi::fixed(0, 0x45).encode().unwrap(),
        X86Msi::fixed(0, 0x46).encode().unwrap(),
    );
    write_entry(&vectors, 0, old.address_lo(), old.data, false);
    vectors.fire(0).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x45), 1, "the path is live");
    sim.refuse_next_commits(1);
    let events = vectors.bar_write(8, &new.data.to_le_bytes());
    assert!(
        matches!(
            events.as_slice(),
            [MsixEvent::AllocationFailed { vector: 0, .. }]
        ),
        "{events:?}"
    );
    vectors.fire(0).unwrap();
    sim.run_until_idle();
    assert_eq!(
        sim.count(0, 0x45),
        1,
        "the old message was delivered after the change"
    );
    assert_eq!(sim.count(0, 0x46), 0);
    assert_eq!(pba(&vectors), 1, "the undelivered fire shows as pending");
    assert!(vectors.retry().is_empty());
    sim.run_until_idle();
    assert_eq!(
        sim.count(0, 0x46),
        1,
        "the retry delivered it on the new message, once"
    );
    vectors.fire(0).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x46), 2);
}

// Written to kill mutants cargo-mutants found surviving in msix/vectors.rs (docs/mutants.md).

#[test]
fn a_tag_is_set_only_while_masked_and_only_on_a_vector_that_exists() {
    use vmirq::msix::MsixError;
    let (_sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    program(&vectors, 1, 0x41, true);
    assert_eq!(vectors.tag(1).unwrap(), None);
    vectors.set_tag(1, Some(0x5a5a)).unwrap();
    assert_eq!(vectors.tag(1).unwrap(), Some(0x5a5a));
    program(&vectors, 1, 0x41, false);
    assert!(matches!(
        vectors.set_tag(1, Some(7)),
        Err(MsixError::TagWhileUnmasked(1))
    ));
    assert_eq!(vectors.tag(1).unwrap(), Some(0x5a5a), "kept while unmasked");
    program(&vectors, 1, 0x41, true);
    vectors.set_tag(1, None).unwrap();
    assert_eq!(vectors.tag(1).unwrap(), None);
    assert!(matches!(
        vectors.set_tag(4, Some(1)),
        Err(MsixError::NoSuchVector(4))
    ));
    assert!(matches!(vectors.tag(4), Err(MsixError::NoSuchVector(4))));
}

#[test]
fn latch_turns_a_masked_vectors_fires_into_its_pending_bit() {
    let (_sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    program(&vectors, 2, 0x42, true);
    vectors.fire(2).unwrap();
    assert!(!vectors.read(|t| t.is_pending(2)), "latched before asked");
    vectors.latch(0..4);
    assert!(vectors.read(|t| t.is_pending(2)));
    assert!(!vectors.read(|t| t.is_pending(1)));
}

#[test]
fn retry_serves_stuck_vectors_and_leaves_masked_ones_alone() {
    let (sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(4)).unwrap();
    vectors.write_message_control(ENABLE);
    program(&vectors, 0, 0x40, true);
    vectors.fire(0).unwrap();
    // Vector 1's route commit is refused: it is stuck.
    sim.refuse_next_commits(1);
    let msg = X86Msi::fixed(0, 0x41).encode().unwrap();
    vectors.bar_write(16, &msg.address_lo().to_le_bytes());
    vectors.bar_write(16 + 8, &msg.data.to_le_bytes());
    assert!(!vectors.bar_write(16 + 12, &0u32.to_le_bytes()).is_empty());
    vectors.fire(1).unwrap();
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x41), 0);
    assert!(vectors.retry().is_empty());
    sim.run_until_idle();
    assert_eq!(sim.count(0, 0x41), 1, "the stuck vector's fire after retry");
    assert_eq!(sim.count(0, 0x40), 0, "retry delivered a masked vector");
}

#[test]
fn dropping_the_device_gives_every_gsi_back() {
    let (sim, irq) = vm();
    let free = irq.free_gsis();
    let vectors = MsixVectors::new(irq.clone(), MsixTable::new(8)).unwrap();
    vectors.write_message_control(ENABLE);
    for v in 0..8 {
        program(&vectors, v, 0x40 + v as u8, false);
    }
    assert_eq!(vectors.routed_vectors(), 8);
    assert_eq!(irq.free_gsis(), free - 8);
    // One commit releases them all.
    let commits = sim.commits();
    drop(vectors);
    assert_eq!(irq.free_gsis(), free);
    assert_eq!(sim.commits(), commits + 1, "one commit for all the routes");
}

#[test]
fn adjacent_table_and_pba_are_one_bar_and_each_decodes_its_own_bytes() {
    use vmirq::msix::MsixLayout;
    let (_sim, irq) = vm();
    // Four vectors: a 64-byte table, then the PBA right after it.
    let layout = MsixLayout { table: 0, pba: 64 };
    let vectors = MsixVectors::with_layout(irq.clone(), MsixTable::new(4), layout).unwrap();
    assert_eq!(vectors.bar_size(), 4096);
    vectors.write_message_control(ENABLE);
    program(&vectors, 3, 0x43, true);
    vectors.fire(3).unwrap();
    let mut pba = [0u8; 8];
    vectors.bar_read(64, &mut pba);
    assert_eq!(
        u64::from_le_bytes(pba),
        1 << 3,
        "the PBA at the table's end"
    );
    // The other order, adjacent too.
    let layout = MsixLayout { table: 8, pba: 0 };
    let other = MsixVectors::with_layout(irq.clone(), MsixTable::new(4), layout).unwrap();
    assert_eq!(other.layout(), layout);
    // Default layout: the PBA at the next 4 KiB boundary; a table past 4 KiB rounds up.
    let default = MsixVectors::new(irq.clone(), MsixTable::new(4)).unwrap();
    assert_eq!(default.bar_size(), 8192);
    // A 300-vector table (4,800 bytes) with its PBA 12 KiB into the BAR.
    let far = MsixLayout {
        table: 0,
        pba: 0x3000,
    };
    let far = MsixVectors::with_layout(irq.clone(), MsixTable::new(300), far).unwrap();
    assert_eq!(far.bar_size(), 0x3000 + 4096);
    // The table last: its end sets the size.
    let late = MsixLayout {
        table: 0x1000,
        pba: 0,
    };
    let late = MsixVectors::with_layout(irq, MsixTable::new(4), late).unwrap();
    assert_eq!(late.bar_size(), 0x2000);
}

#[test]
fn a_pba_read_latches_the_vectors_of_the_qword_it_reads() {
    let (_sim, irq) = vm();
    let vectors = MsixVectors::new(irq, MsixTable::new(128)).unwrap();
    vectors.write_message_control(ENABLE);
    program(&vectors, 70, 0x46, true);
    vectors.fire(70).unwrap();
    let mut qword = [0u8; 8];
    vectors.bar_read(vectors.pba_offset() + 8, &mut qword);
    assert_eq!(
        u64::from_le_bytes(qword),
        1 << 6,
        "vector 70 is bit 6 of qword 1"
    );
}
