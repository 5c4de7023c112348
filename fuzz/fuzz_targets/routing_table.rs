//! Routing-table batches: arbitrary add/set/remove sequences keep KVM's rules (≤ 4096 GSIs, pin
//! ranges, only IRQCHIP routes of different chips share a GSI) and the table's own accounting.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmirq::route::{IrqChip, MAX_GSIS};
use vmirq::{Gsi, MsiMessage, Route, RoutingTable};

#[derive(Arbitrary, Debug)]
enum R {
    Pic(bool, u8),
    Ioapic(u8),
    Msi(u32, u32),
    Xen(u32, u32, u8),
}

#[derive(Arbitrary, Debug)]
enum Op {
    Add(u16, R),
    Set(u16, R),
    Remove(u16),
}

fn route(r: &R) -> Route {
    match *r {
        R::Pic(slave, pin) => Route::Irqchip {
            chip: if slave {
                IrqChip::PicSlave
            } else {
                IrqChip::PicMaster
            },
            pin: u32::from(pin % 12),
        },
        R::Ioapic(pin) => Route::ioapic(u32::from(pin % 30)),
        R::Msi(lo, data) => Route::msi(MsiMessage::new(u64::from(lo), data)),
        R::Xen(port, vcpu, priority) => Route::XenEvtchn {
            port,
            vcpu,
            priority: u32::from(priority % 20),
        },
    }
}

fuzz_target!(|ops: Vec<Op>| {
    let mut t = RoutingTable::new(24);
    for op in &ops {
        let before = t.clone();
        let result = match op {
            Op::Add(g, r) => t.add(Gsi::from_raw(u32::from(*g) % 4200), route(r)),
            Op::Set(g, r) => t.set(Gsi::from_raw(u32::from(*g) % 4200), route(r)),
            Op::Remove(g) => {
                t.remove(Gsi::from_raw(u32::from(*g) % 4200));
                Ok(())
            }
        };
        if result.is_err() {
            assert_eq!(t, before, "a refused change left a trace: {op:?}");
        }
        assert_eq!(t.len(), t.iter().count());
        let mut last: Option<(Gsi, Vec<Route>)> = None;
        for (gsi, r) in t.iter() {
            assert!(gsi.raw() < MAX_GSIS);
            match &mut last {
                Some((g, routes)) if *g == gsi => {
                    // Sharing: only IRQCHIP routes, each of a different chip.
                    for other in routes.iter() {
                        match (other, r) {
                            (Route::Irqchip { chip: a, .. }, Route::Irqchip { chip: b, .. }) => {
                                assert_ne!(a, b, "{gsi} shares a chip")
                            }
                            _ => panic!("{gsi} shares a non-IRQCHIP route"),
                        }
                    }
                    routes.push(*r);
                }
                _ => last = Some((gsi, vec![*r])),
            }
            if let Route::Irqchip { chip, pin } = *r {
                let pins = if chip == IrqChip::Ioapic { 24 } else { 8 };
                assert!(pin < pins);
            }
        }
    }
});
