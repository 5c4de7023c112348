//! Property tests: arbitrary guest accesses and manager updates keep the MSI-X and MSI
//! invariants, and every effect is exactly the change of deliverability it claims.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::super::spec;
use super::super::{MsiCapability, MsixTable, VectorEffects, ENTRY_SIZE};
use crate::msi::MsiMessage;

#[derive(Clone, Debug)]
enum Op {
    TableRead { offset: u64, len: usize },
    TableWrite { offset: u64, data: Vec<u8> },
    PbaRead { offset: u64, len: usize },
    PbaWrite { offset: u64, data: Vec<u8> },
    Control(u16),
    SetPending { vector: u16, pending: bool },
    Reset,
}

/// Offsets biased to entry fields, with some anywhere in and past the region.
fn offset(region: u64) -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => (0..region / 4 + 16).prop_map(|d| d * 4),
        1 => 0..region + 64,
        1 => Just(u64::MAX - 3),
    ]
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        // Mostly mask bit 0/1 and small data, so vectors really flip.
        3 => (0u64..4).prop_map(|v| v.to_le_bytes()[..4].to_vec()),
        2 => (any::<u64>(), prop_oneof![Just(4usize), Just(8usize)])
            .prop_map(|(v, len)| v.to_le_bytes()[..len].to_vec()),
        1 => prop::collection::vec(any::<u8>(), 1..=8),
    ]
}

fn msix_op(vectors: u16) -> impl Strategy<Value = Op> {
    let table = u64::from(vectors) * ENTRY_SIZE;
    let pba = spec::pba_bytes(vectors);
    prop_oneof![
        2 => (offset(table), 1usize..=8).prop_map(|(offset, len)| Op::TableRead { offset, len }),
        6 => (offset(table), bytes()).prop_map(|(offset, data)| Op::TableWrite { offset, data }),
        1 => (offset(pba), 1usize..=8).prop_map(|(offset, len)| Op::PbaRead { offset, len }),
        1 => (offset(pba), bytes()).prop_map(|(offset, data)| Op::PbaWrite { offset, data }),
        3 => any::<u16>().prop_map(Op::Control),
        3 => (0..vectors + 4, any::<bool>())
            .prop_map(|(vector, pending)| Op::SetPending { vector, pending }),
        1 => Just(Op::Reset),
    ]
}

/// Checks that `fx` reports exactly the change between two snapshots of (deliverable, message).
fn check_effects(
    fx: &VectorEffects,
    (was_enabled, before): (bool, &[(bool, Option<MsiMessage>)]),
    (now_enabled, after): (bool, &[(bool, Option<MsiMessage>)]),
) -> Result<(), TestCaseError> {
    prop_assert_eq!(
        fx.disabled,
        was_enabled && !now_enabled,
        "disabled iff enable 1 -> 0"
    );
    for list in [&fx.unmasked, &fx.masked, &fx.message_changed] {
        prop_assert!(
            list.windows(2).all(|w| w[0] < w[1]),
            "sorted, unique: {:?}",
            list
        );
    }
    let was: BTreeSet<usize> = (0..before.len()).filter(|&v| before[v].0).collect();
    let now: BTreeSet<usize> = (0..after.len()).filter(|&v| after[v].0).collect();
    let set = |l: &Vec<u16>| l.iter().map(|&v| usize::from(v)).collect::<BTreeSet<_>>();
    if fx.disabled {
        prop_assert!(now.is_empty(), "nothing deliverable after disable");
        prop_assert!(fx.unmasked.is_empty() && fx.masked.is_empty());
        prop_assert!(fx.message_changed.is_empty());
        return Ok(());
    }
    prop_assert_eq!(set(&fx.unmasked), &now - &was);
    prop_assert_eq!(set(&fx.masked), &was - &now);
    let changed: BTreeSet<usize> = was
        .intersection(&now)
        .copied()
        .filter(|&v| before[v].1 != after[v].1)
        .collect();
    prop_assert_eq!(set(&fx.message_changed), changed);
    Ok(())
}

fn msix_snapshot(t: &MsixTable) -> Vec<(bool, Option<MsiMessage>)> {
    (0..t.vectors())
        .map(|v| (!t.is_masked(v), t.message(v)))
        .collect()
}

fn check_msix(t: &MsixTable, vectors: u16) -> Result<(), TestCaseError> {
    prop_assert_eq!(t.vectors(), vectors);
    prop_assert_eq!(
        t.message_control() & spec::MSIX_CTRL_TABLE_SIZE,
        vectors - 1
    );
    prop_assert_eq!(t.message_control() & 0x3800, 0, "reserved control bits");
    for v in 0..vectors + 4 {
        let deliverable = t.is_enabled() && !t.function_masked() && !t.entry_masked(v);
        prop_assert_eq!(t.is_masked(v), !deliverable);
    }
    for v in 0..vectors {
        let mut data = [0u8; 4];
        t.table_read(
            u64::from(v) * ENTRY_SIZE + spec::ENTRY_VECTOR_CONTROL,
            &mut data,
        );
        let control = u32::from_le_bytes(data);
        prop_assert_eq!(control & !1, 0, "reserved vector control bits");
        prop_assert_eq!(control == 1, t.entry_masked(v));
    }
    for q in 0..t.pba_bytes() / 8 {
        let mut data = [0u8; 8];
        t.pba_read(q * 8, &mut data);
        let bits = u64::from_le_bytes(data);
        for bit in 0..64u64 {
            let v = q * 64 + bit;
            let expected = v < u64::from(vectors) && t.is_pending(v as u16);
            prop_assert_eq!(bits & 1 << bit != 0, expected, "PBA bit of {}", v);
        }
    }
    let pending: Vec<u16> = (0..vectors).filter(|&v| t.is_pending(v)).collect();
    prop_assert_eq!(t.pending_vectors().collect::<Vec<_>>(), pending);
    Ok(())
}

fn valid(offset: u64, len: usize, size: u64) -> bool {
    matches!(len, 4 | 8) && offset % len as u64 == 0 && offset.saturating_add(len as u64) <= size
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn msix_accesses_keep_invariants_and_report_exact_transitions(
        (vectors, ops) in prop_oneof![1u16..=3, 60u16..=130]
            .prop_flat_map(|n| (Just(n), prop::collection::vec(msix_op(n), 1..80)))
    ) {
        let mut t = MsixTable::new(vectors);
        for op in ops {
            let was_enabled = t.is_enabled();
            let before = msix_snapshot(&t);
            let pending_before: Vec<bool> = (0..vectors).map(|v| t.is_pending(v)).collect();
            let mut fx = VectorEffects::default();
            match &op {
                Op::TableRead { offset, len } => {
                    let mut data = vec![0u8; *len];
                    t.table_read(*offset, &mut data);
                    if !valid(*offset, *len, t.table_bytes()) {
                        prop_assert!(data.iter().all(|&b| b == 0xff));
                    }
                }
                Op::TableWrite { offset, data } => {
                    t.table_write(*offset, data, &mut fx);
                    if !valid(*offset, data.len(), t.table_bytes()) {
                        prop_assert_eq!(&msix_snapshot(&t), &before, "ignored write");
                    }
                }
                Op::PbaRead { offset, len } => {
                    let mut data = vec![0u8; *len];
                    t.pba_read(*offset, &mut data);
                    if !valid(*offset, *len, t.pba_bytes()) {
                        prop_assert!(data.iter().all(|&b| b == 0xff));
                    }
                }
                Op::PbaWrite { offset, data } => t.pba_write(*offset, data),
                Op::Control(value) => t.write_message_control(*value, &mut fx),
                Op::SetPending { vector, pending } => t.set_pending(*vector, *pending),
                Op::Reset => t.reset(&mut fx),
            }
            check_effects(&fx, (was_enabled, &before), (t.is_enabled(), &msix_snapshot(&t)))?;
            // Only the manager and reset touch pending bits.
            let pending_after: Vec<bool> = (0..vectors).map(|v| t.is_pending(v)).collect();
            if !matches!(op, Op::SetPending { .. } | Op::Reset) {
                prop_assert_eq!(pending_before, pending_after);
            }
            check_msix(&t, vectors)?;
        }
    }
}

#[derive(Clone, Debug)]
enum MsiOp {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    SetPending { vector: u16, pending: bool },
    Reset,
}

fn msi_op() -> impl Strategy<Value = MsiOp> {
    let offset =
        prop_oneof![3 => (0u64..8).prop_map(|d| d * 4), 1 => 0u64..0x40, 1 => Just(u64::MAX)];
    let data = prop_oneof![
        // Control words with enable and small MME.
        2 => (any::<bool>(), 0u16..8).prop_map(|(e, mme)| (u16::from(e) | mme << 4).to_le_bytes().to_vec()),
        2 => bytes(),
    ];
    prop_oneof![
        1 => (offset.clone(), 1usize..=8).prop_map(|(offset, len)| MsiOp::Read { offset, len }),
        2 => (prop_oneof![Just(2u64), offset], data).prop_map(|(offset, data)| MsiOp::Write { offset, data }),
        1 => (0u16..40, any::<bool>()).prop_map(|(vector, pending)| MsiOp::SetPending { vector, pending }),
        1 => Just(MsiOp::Reset),
    ]
}

fn msi_snapshot(c: &MsiCapability) -> Vec<(bool, Option<MsiMessage>)> {
    (0..spec::MSI_MAX_VECTORS as u16)
        .map(|v| (!c.is_masked(v), c.message(v)))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn msi_accesses_keep_invariants_and_report_exact_transitions(
        max in 0u8..=40, is_64bit: bool, pvm: bool,
        ops in prop::collection::vec(msi_op(), 1..60),
    ) {
        let mut c = MsiCapability::new(max, is_64bit, pvm);
        let ro = c.message_control() & !(spec::MSI_CTRL_ENABLE | 0x70);
        let len = c.len();
        let mask_offset = match (pvm, is_64bit) {
            (false, _) => None,
            (true, false) => Some(spec::MSI_MASK_32),
            (true, true) => Some(spec::MSI_MASK_64),
        };
        for op in ops {
            let was_enabled = c.is_enabled();
            let before = msi_snapshot(&c);
            let mut fx = VectorEffects::default();
            match op {
                MsiOp::Read { offset, len: n } => {
                    let mut data = vec![0u8; n];
                    c.config_read(offset, &mut data);
                    for (i, b) in data.iter().enumerate() {
                        if offset.checked_add(i as u64).is_none_or(|at| at >= len) {
                            prop_assert_eq!(*b, 0xff);
                        }
                    }
                }
                MsiOp::Write { offset, data } => c.config_write(offset, &data, &mut fx),
                MsiOp::SetPending { vector, pending } => c.set_pending(vector, pending),
                MsiOp::Reset => c.reset(&mut fx),
            }
            check_effects(&fx, (was_enabled, &before), (c.is_enabled(), &msi_snapshot(&c)))?;

            let control = c.message_control();
            prop_assert_eq!(control & !(spec::MSI_CTRL_ENABLE | 0x70), ro, "read-only control bits");
            let mme = control >> 4 & 7;
            prop_assert!(1u16 << mme <= c.max_vectors());
            let mut header = [0u8; 4];
            c.config_read(0, &mut header);
            prop_assert_eq!(u32::from_le_bytes(header), 0x05 | u32::from(control) << 16);
            let mask = mask_offset.map(|m| {
                let mut d = [0u8; 4];
                c.config_read(m, &mut d);
                u32::from_le_bytes(d)
            });
            for v in 0..40u16 {
                let masked_bit = v < 32 && mask.is_some_and(|m| m & 1 << v != 0);
                let deliverable = c.is_enabled() && v < 1 << mme && !masked_bit;
                prop_assert_eq!(c.is_masked(v), !deliverable, "vector {}", v);
                prop_assert_eq!(c.message(v).is_some(), v < 1 << mme);
                if let Some(msg) = c.message(v) {
                    prop_assert_eq!(msg.data & ((1 << mme) - 1), u32::from(v));
                }
                prop_assert!(!c.is_pending(v) || (pvm && v < c.max_vectors()));
            }
            if let Some(m) = mask_offset {
                let mut d = [0u8; 4];
                c.config_read(m + 4, &mut d);
                let bits = u32::from_le_bytes(d);
                for v in 0..32u16 {
                    prop_assert_eq!(bits & 1 << v != 0, c.is_pending(v));
                }
                prop_assert_eq!(mask.unwrap() & !(u32::MAX >> (32 - u32::from(c.max_vectors()))), 0);
            }
        }
    }
}
