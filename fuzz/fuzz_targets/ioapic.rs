//! The userspace IOAPIC as the guest and devices drive it: any sequence of MMIO accesses (any
//! offset and width), line and resampled-line changes, EOIs and deferred re-deliveries keeps
//! the 82093AA's invariants; never a panic.
#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vmirq::ioapic::{spec, Effects, Ioapic, IOAPIC_MMIO_SIZE};

const PINS: u32 = 6;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u16, len: u8 },
    Write { offset: u16, data: Vec<u8> },
    Select(u8),
    Window(u32),
    Line { pin: u8, level: bool },
    Resampled { pin: u8, level: bool },
    Eoi(u8),
    Redeliver(u8),
    Reset,
}

fuzz_target!(|ops: Vec<Op>| {
    let mut io = Ioapic::new(PINS);
    // Pins delivered since their Remote IRR was last clear; pins the storm guard deferred.
    let mut outstanding = [false; PINS as usize];
    let mut deferred = [false; PINS as usize];
    for op in ops.iter().take(2000) {
        let before: Vec<_> = (0..PINS).map(|p| io.entry(p).unwrap()).collect();
        let mut fx = Effects::default();
        match op {
            Op::Read { offset, len } => {
                let mut data = vec![0; usize::from(*len % 9)];
                io.mmio_read(u64::from(*offset) % (IOAPIC_MMIO_SIZE + 16), &mut data);
            }
            Op::Write { offset, data } => {
                let data = &data[..data.len().min(9)];
                io.mmio_write(u64::from(*offset) % (IOAPIC_MMIO_SIZE + 16), data, &mut fx);
            }
            Op::Select(reg) => io.mmio_write(spec::IOREGSEL, &[*reg], &mut fx),
            Op::Window(v) => io.mmio_write(spec::IOWIN, &v.to_le_bytes(), &mut fx),
            Op::Line { pin, level } => io.set_line(u32::from(*pin % 8), *level, &mut fx),
            Op::Resampled { pin, level } => {
                io.set_resampled_line(u32::from(*pin % 8), *level, &mut fx)
            }
            Op::Eoi(v) => io.eoi(*v, &mut fx),
            Op::Redeliver(pin) => io.redeliver_deferred(u32::from(*pin % 8), &mut fx),
            Op::Reset => {
                io.reset();
                outstanding = [false; PINS as usize];
            }
        }
        if matches!(op, Op::Read { .. }) {
            assert!(fx.is_empty(), "a read had effects");
        }
        let mut seen = [false; PINS as usize];
        for (pin, msg) in &fx.deliver {
            assert!(*pin < PINS);
            assert!(
                !std::mem::replace(&mut seen[*pin as usize], true),
                "pin {pin} twice"
            );
            let entry = io.entry(*pin).unwrap();
            assert!(!entry.masked(), "masked pin {pin} delivered");
            assert_eq!(Some(*msg), io.pin_msi(*pin));
            let was = before[*pin as usize];
            if was.is_level() && was.remote_irr() && !matches!(op, Op::Reset) {
                assert!(
                    matches!(op, Op::Eoi(v) if *v == was.vector()),
                    "pin {pin} re-delivered with Remote IRR set: {op:?}"
                );
            }
            outstanding[*pin as usize] = true;
            deferred[*pin as usize] = false;
        }
        for pin in fx
            .deferred
            .iter()
            .chain(&fx.resample)
            .chain(&fx.routes_changed)
        {
            assert!(*pin < PINS);
        }
        for pin in &fx.deferred {
            deferred[*pin as usize] = true;
        }
        for pin in 0..PINS {
            let entry = io.entry(pin).unwrap();
            if entry.remote_irr() {
                assert!(entry.is_level(), "Remote IRR on edge pin {pin}");
                assert!(outstanding[pin as usize], "Remote IRR without a delivery");
            } else {
                outstanding[pin as usize] = false;
            }
            // No lost level interrupt: asserted, unmasked and not pending means deferred.
            if entry.is_level() && !entry.masked() && io.line(pin) && !entry.remote_irr() {
                assert!(deferred[pin as usize], "pin {pin} lost its level");
            }
        }
    }
});
