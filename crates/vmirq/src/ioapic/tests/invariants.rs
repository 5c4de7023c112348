//! Property test: arbitrary guest and device operations keep the IOAPIC's invariants.

use std::collections::BTreeSet;

use proptest::prelude::*;

use super::{delivered, spec, Effects, Ioapic, RedirectionEntry, IOAPIC_MMIO_SIZE};

/// Operations a guest and the devices can perform, biased towards the interesting registers.
#[derive(Clone, Debug)]
enum Op {
    Read { offset: u64, len: usize },
    Write { offset: u64, data: Vec<u8> },
    Select(u8),
    WriteWindow(u32),
    SetLine { pin: u32, level: bool },
    SetResampled { pin: u32, level: bool },
    Eoi(u8),
    RedeliverDeferred(u32),
}

const PROP_PINS: u32 = 6;
const PROP_VECTORS: std::ops::Range<u8> = 0x30..0x34;

fn op() -> impl Strategy<Value = Op> {
    let offset = prop_oneof![Just(0u64), Just(0x10u64), 0u64..IOAPIC_MMIO_SIZE];
    let pin = 0..PROP_PINS + 2;
    prop_oneof![
        1 => (offset.clone(), 1usize..=8).prop_map(|(offset, len)| Op::Read { offset, len }),
        1 => (offset, prop::collection::vec(any::<u8>(), 1..=8))
            .prop_map(|(offset, data)| Op::Write { offset, data }),
        3 => prop_oneof![0u8..0x20, any::<u8>()].prop_map(Op::Select),
        3 => (any::<u32>(), PROP_VECTORS, any::<bool>()).prop_map(|(bits, vector, fixed)| {
            // Mostly fixed delivery so that level pins are common.
            let bits = if fixed { bits & !0x700 } else { bits };
            Op::WriteWindow(bits & !0xff | u32::from(vector))
        }),
        4 => (pin.clone(), any::<bool>()).prop_map(|(pin, level)| Op::SetLine { pin, level }),
        2 => (pin.clone(), any::<bool>()).prop_map(|(pin, level)| Op::SetResampled { pin, level }),
        3 => prop_oneof![PROP_VECTORS, any::<u8>()].prop_map(Op::Eoi),
        1 => pin.prop_map(Op::RedeliverDeferred),
    ]
}

fn apply(io: &mut Ioapic, op: &Op, fx: &mut Effects) {
    match op {
        Op::Read { offset, len } => io.mmio_read(*offset, &mut vec![0; *len]),
        Op::Write { offset, data } => io.mmio_write(*offset, data, fx),
        Op::Select(reg) => io.mmio_write(spec::IOREGSEL, &[*reg], fx),
        Op::WriteWindow(value) => io.mmio_write(spec::IOWIN, &value.to_le_bytes(), fx),
        Op::SetLine { pin, level } => io.set_line(*pin, *level, fx),
        Op::SetResampled { pin, level } => io.set_resampled_line(*pin, *level, fx),
        Op::Eoi(vector) => io.eoi(*vector, fx),
        Op::RedeliverDeferred(pin) => io.redeliver_deferred(*pin, fx),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_op_sequence_keeps_the_invariants(ops in prop::collection::vec(op(), 1..200)) {
        let mut io = Ioapic::new(PROP_PINS);
        // Pins delivered since their Remote IRR was last clear.
        let mut outstanding = [false; PROP_PINS as usize];
        let mut deferred = BTreeSet::new();
        for op in &ops {
            let before: Vec<RedirectionEntry> =
                (0..PROP_PINS).map(|p| io.entry(p).unwrap()).collect();
            let mut fx = Effects::default();
            apply(&mut io, op, &mut fx);

            if matches!(op, Op::Read { .. }) {
                prop_assert!(fx.is_empty());
                for pin in 0..PROP_PINS {
                    prop_assert_eq!(io.entry(pin).unwrap(), before[pin as usize]);
                }
            }
            let all: Vec<u32> = fx.routes_changed.iter().chain(&fx.resample)
                .chain(&fx.deferred).copied().chain(delivered(&fx)).collect();
            prop_assert!(all.iter().all(|pin| *pin < PROP_PINS), "{:?}", fx);

            let pins = delivered(&fx);
            prop_assert!(pins.len() <= PROP_PINS as usize);
            prop_assert_eq!(pins.iter().collect::<BTreeSet<_>>().len(), pins.len(),
                "a pin delivered twice in one op");
            for (pin, msg) in &fx.deliver {
                let entry = io.entry(*pin).unwrap();
                prop_assert!(!entry.masked(), "masked pin {} delivered", pin);
                prop_assert_eq!(msg.decode().unwrap().vector, entry.vector());
                prop_assert_eq!(Some(*msg), io.pin_msi(*pin));
                // Only the EOI of its vector lets a pending level pin deliver again.
                let was = before[*pin as usize];
                if was.is_level() && was.remote_irr() {
                    prop_assert!(matches!(op, Op::Eoi(v) if *v == was.vector()), "{:?}", op);
                }
                outstanding[*pin as usize] = true;
                deferred.remove(pin);
            }
            deferred.extend(fx.deferred.iter().copied());

            for pin in 0..PROP_PINS {
                let entry = io.entry(pin).unwrap();
                prop_assert!(!entry.delivery_status());
                if entry.remote_irr() {
                    prop_assert!(entry.is_level(), "remote IRR on edge pin {}", pin);
                    prop_assert!(outstanding[pin as usize], "remote IRR without delivery");
                } else {
                    outstanding[pin as usize] = false;
                }
                // No lost level interrupt: asserted, unmasked and not pending means deferred.
                if entry.is_level() && !entry.masked() && io.line(pin) && !entry.remote_irr() {
                    prop_assert!(deferred.contains(&pin), "pin {} lost its level", pin);
                }
            }
        }
    }
}
