//! MSI-X with dynamic vectors end to end: the real-mode guest programs an emulated MSI-X BAR
//! through MMIO exits; vectors get their GSI, route and irqfd when first unmasked.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmirq::msix::{MsixEvent, MsixTable, MsixVectors};
use vmirq::{Config, X86Msi};
use vmirq_guest::machine::{mmio_read_op, Machine, MachineConfig, MmioDevice, Mode};
use vmirq_guest::on_every_machine;

const WAIT: Duration = Duration::from_secs(5);
/// Where the test device's MSI-X BAR sits in guest physical memory.
const BAR: u32 = 0xD000_0000;
const ENABLE: u16 = 1 << 15;
const FUNCTION_MASK: u16 = 1 << 14;

/// The BAR as the guest sees it, recording the events the VMM would be told about.
struct Bar {
    vectors: MsixVectors,
    events: Mutex<Vec<MsixEvent>>,
}

impl MmioDevice for Bar {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.vectors.bar_read(offset, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let events = self.vectors.bar_write(offset, data);
        self.events.lock().unwrap().extend(events);
    }
}

fn device(m: &dyn Machine, n: u16) -> Arc<Bar> {
    let vectors = MsixVectors::new(Arc::clone(m.interrupts()), MsixTable::new(n)).unwrap();
    let bar = Arc::new(Bar {
        vectors,
        events: Mutex::new(Vec::new()),
    });
    let size = bar.vectors.bar_size();
    m.mmio_bus().add(u64::from(BAR), size, bar.clone());
    bar
}

/// The guest MMIO writes that program table entry `v`: message to APIC `dest`, `vector`.
fn entry(v: u16, dest: u32, vector: u8, masked: bool) -> [(u32, u32); 4] {
    let msg = X86Msi::fixed(dest, vector).encode().unwrap();
    let base = BAR + u32::from(v) * 16;
    [
        (base, msg.address_lo()),
        (base + 4, msg.address_hi()),
        (base + 8, msg.data),
        (base + 12, u32::from(masked)),
    ]
}

fn two_vcpus(mode: Mode) -> MachineConfig {
    MachineConfig::new(2, mode.irqchip())
}

fn pba_word(m: &dyn Machine, bar: &Bar) -> u32 {
    let pba = BAR + bar.vectors.pba_offset() as u32;
    m.guest_mmio(&[mmio_read_op(pba)]).unwrap()[0]
}

on_every_machine!(
    guest_programmed_vectors_reach_their_vcpu,
    two_vcpus,
    |m: &dyn Machine, _| {
        let bar = device(m, 8);
        bar.vectors.write_message_control(ENABLE);
        assert_eq!(
            bar.vectors.routed_vectors(),
            0,
            "enabling allocates nothing"
        );
        let mut script = Vec::new();
        for v in 0..4u16 {
            script.extend(entry(v, u32::from(v % 2), 0x80 + v as u8, false));
        }
        m.guest_mmio(&script).unwrap();
        assert_eq!(
            bar.vectors.routed_vectors(),
            4,
            "one GSI per unmasked vector"
        );
        // The guest reads back what it wrote.
        let r = m
            .guest_mmio(&[mmio_read_op(BAR + 8), mmio_read_op(BAR + 12)])
            .unwrap();
        assert_eq!(r, [0x80, 0]);
        for v in 0..4u16 {
            bar.vectors.fire(v).unwrap();
            let ev = m
                .wait_isr(None, 0x80 + v as u8, WAIT)
                .expect("vector never arrived");
            assert_eq!(ev.vcpu, usize::from(v % 2));
        }
        // Adding a vector later disturbs none of the active ones.
        m.guest_mmio(&entry(5, 1, 0x85, false)).unwrap();
        for v in [0u16, 5] {
            bar.vectors.fire(v).unwrap();
            assert!(m.wait_isr(None, 0x80 + v as u8, WAIT).is_some());
        }
        assert!(bar.events.lock().unwrap().is_empty());
    }
);

on_every_machine!(
    a_masked_vector_latches_its_pba_bit_and_fires_once_on_unmask,
    two_vcpus,
    |m: &dyn Machine, _| {
        let bar = device(m, 8);
        bar.vectors.write_message_control(ENABLE);
        m.guest_mmio(&entry(3, 0, 0x93, true)).unwrap();
        for _ in 0..3 {
            bar.vectors.fire(3).unwrap();
        }
        m.control(0);
        assert_eq!(m.count(0, 0x93), 0, "a masked vector delivered");
        assert_eq!(pba_word(m, &bar), 1 << 3, "the guest sees the pending bit");
        // Unmask (vector control only): one delivery, pending cleared.
        m.guest_mmio(&[(BAR + 3 * 16 + 12, 0)]).unwrap();
        assert_eq!(m.wait_count(0, 0x93, 1, WAIT), 1);
        m.control(0);
        assert_eq!(m.count(0, 0x93), 1, "pending delivered exactly once");
        assert_eq!(pba_word(m, &bar), 0);
        // Function mask works the same way.
        bar.vectors.write_message_control(ENABLE | FUNCTION_MASK);
        bar.vectors.fire(3).unwrap();
        m.control(0);
        assert_eq!(m.count(0, 0x93), 1);
        assert_eq!(pba_word(m, &bar), 1 << 3);
        bar.vectors.write_message_control(ENABLE);
        assert_eq!(m.wait_count(0, 0x93, 2, WAIT), 2);
        m.control(0);
        assert_eq!(m.count(0, 0x93), 2, "pending delivered exactly once");
    }
);

on_every_machine!(
    a_trigger_racing_mask_and_unmask_is_never_lost,
    two_vcpus,
    |m: &dyn Machine, _| {
        let bar = device(m, 2);
        bar.vectors.write_message_control(ENABLE);
        m.guest_mmio(&entry(0, 1, 0xA0, false)).unwrap();
        let trigger = bar.vectors.trigger(0).unwrap();
        let firing = std::thread::spawn(move || {
            for _ in 0..2_000 {
                trigger.write(1).unwrap();
                std::thread::yield_now();
            }
        });
        for i in 0..40 {
            m.guest_mmio(&[(BAR + 12, i % 2)]).unwrap();
        }
        firing.join().unwrap();
        m.guest_mmio(&[(BAR + 12, 0)]).unwrap();
        // The last trigger is delivered: by the irqfd, or as the pending bit at the last unmask.
        assert!(m.wait_count(1, 0xA0, 1, WAIT) >= 1);
        m.control(1);
        let before = m.count(1, 0xA0);
        bar.vectors.fire(0).unwrap();
        assert_eq!(m.wait_count(1, 0xA0, before + 1, WAIT), before + 1);
        m.control(1);
        assert_eq!(m.count(1, 0xA0), before + 1, "one fire, one interrupt");
        assert_eq!(pba_word(m, &bar), 0, "nothing left pending after unmask");
    }
);

on_every_machine!(
    all_2048_vectors_enabled_and_delivered,
    two_vcpus,
    |m: &dyn Machine, _| {
        let bar = device(m, 2048);
        // Program every entry unmasked behind the function mask, then lift it: one route commit.
        bar.vectors.write_message_control(ENABLE | FUNCTION_MASK);
        let entries: Vec<(u64, [u8; 16])> = (0..2048u16)
            .map(|v| {
                let msg = X86Msi::fixed(u32::from(v % 2), 0x20 + (v % 224) as u8)
                    .encode()
                    .unwrap();
                let mut e = [0u8; 16];
                e[0..4].copy_from_slice(&msg.address_lo().to_le_bytes());
                e[8..12].copy_from_slice(&msg.data.to_le_bytes());
                (u64::from(v) * 16, e)
            })
            .collect();
        for (off, e) in &entries {
            bar.vectors.bar_write(*off, &e[0..8]);
            bar.vectors.bar_write(off + 8, &e[8..16]);
        }
        assert_eq!(bar.vectors.routed_vectors(), 0);
        bar.vectors.write_message_control(ENABLE);
        assert_eq!(bar.vectors.routed_vectors(), 2048);
        for v in 0..2048u16 {
            let (cpu, vector) = (usize::from(v % 2), 0x20 + (v % 224) as u8);
            let before = m.count(cpu, vector);
            bar.vectors.fire(v).unwrap();
            assert_eq!(
                m.wait_count(cpu, vector, before + 1, WAIT),
                before + 1,
                "vector {v} lost"
            );
        }
        bar.vectors.write_message_control(0);
        assert_eq!(
            bar.vectors.routed_vectors(),
            0,
            "disable gives back every GSI"
        );
    }
);

fn few_gsis(mode: Mode) -> MachineConfig {
    let mut c = MachineConfig::new(1, mode.irqchip());
    c.interrupts = Config {
        first_dynamic_gsi: 24,
        gsi_limit: 26,
        ..Config::default()
    };
    c
}

on_every_machine!(
    gsi_exhaustion_is_reported_and_the_vector_stays_pending,
    few_gsis,
    |m: &dyn Machine, _| {
        // Two allocatable GSIs; the VMM holds one elsewhere.
        let hog = m.interrupts().allocate_route().unwrap();
        let bar = device(m, 4);
        bar.vectors.write_message_control(ENABLE);
        let mut script = Vec::new();
        for v in 0..2u16 {
            script.extend(entry(v, 0, 0xB0 + v as u8, false));
        }
        m.guest_mmio(&script).unwrap();
        let failed: Vec<u16> = bar
            .events
            .lock()
            .unwrap()
            .drain(..)
            .map(|e| match e {
                MsixEvent::AllocationFailed { vector, .. } => vector,
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            failed,
            [1],
            "one GSI for two vectors: the second is refused, typed"
        );
        bar.vectors.fire(1).unwrap();
        m.control(0);
        assert_eq!(m.count(0, 0xB1), 0);
        assert_eq!(
            pba_word(m, &bar),
            1 << 1,
            "the unserved vector shows as pending"
        );
        // The host frees a GSI; the VMM retries: the vector gets it and its pending interrupt.
        drop(hog);
        assert!(bar.vectors.retry().is_empty());
        assert_eq!(bar.vectors.routed_vectors(), 2);
        assert_eq!(m.wait_count(0, 0xB1, 1, WAIT), 1);
        assert_eq!(pba_word(m, &bar), 0);
        bar.vectors.fire(1).unwrap();
        assert_eq!(m.wait_count(0, 0xB1, 2, WAIT), 2);
    }
);

on_every_machine!(
    hot_plug_cycles_leak_no_gsi,
    two_vcpus,
    |m: &dyn Machine, _| {
        let free = m.interrupts().free_gsis();
        let bar = device(m, 4);
        for (off, e) in (0..4u64).map(|v| (v * 16, entry(v as u16, 0, 0xC0, false))) {
            for (i, (_, val)) in e.iter().enumerate() {
                bar.vectors
                    .bar_write(off + 4 * i as u64, &val.to_le_bytes());
            }
        }
        let cycles = if m.kind() == "sim" { 10_000 } else { 500 };
        for _ in 0..cycles {
            bar.vectors.write_message_control(ENABLE);
            assert_eq!(bar.vectors.routed_vectors(), 4);
            bar.vectors.write_message_control(0);
        }
        assert_eq!(bar.vectors.routed_vectors(), 0);
        assert_eq!(m.interrupts().free_gsis(), free);
    }
);

on_every_machine!(
    a_tag_changes_only_while_masked,
    two_vcpus,
    |m: &dyn Machine, _| {
        let bar = device(m, 2);
        bar.vectors.write_message_control(ENABLE);
        bar.vectors.set_tag(0, Some(0x1234)).unwrap();
        m.guest_mmio(&entry(0, 0, 0xD0, false)).unwrap();
        assert_eq!(
            bar.vectors.tag(0).unwrap(),
            Some(0x1234),
            "producers read the tag"
        );
        assert!(
            bar.vectors.set_tag(0, Some(7)).is_err(),
            "changed while unmasked"
        );
        m.guest_mmio(&[(BAR + 12, 1)]).unwrap();
        bar.vectors.set_tag(0, Some(7)).unwrap();
        assert_eq!(bar.vectors.tag(0).unwrap(), Some(7));
    }
);

on_every_machine!(
    msi_multiple_message_vectors_reach_the_guest,
    two_vcpus,
    |m: &dyn Machine, _| {
        use vmirq::msix::{MsiCapability, MsiVectors};
        let msi = MsiVectors::new(
            Arc::clone(m.interrupts()),
            MsiCapability::new(8, true, true),
        )
        .unwrap();
        let msg = X86Msi::fixed(1, 0xE0).encode().unwrap();
        // Config-space writes as the guest's config cycles would make them: 64-bit address,
        // data, then enable with 4 vectors (MME = 2). Vector i sends data | i.
        let (_, events) = msi.update(|c, fx| {
            c.config_write(0x04, &msg.address_lo().to_le_bytes(), fx);
            c.config_write(0x08, &msg.address_hi().to_le_bytes(), fx);
            c.config_write(0x0C, &(msg.data as u16).to_le_bytes(), fx);
            c.config_write(0x02, &(1u16 | 2 << 4).to_le_bytes(), fx);
        });
        assert!(events.is_empty());
        assert_eq!(msi.routed_vectors(), 4, "only the enabled vectors get GSIs");
        for v in 0..4u16 {
            msi.fire(v).unwrap();
            let ev = m
                .wait_isr(Some(1), 0xE0 + v as u8, WAIT)
                .expect("MSI vector lost");
            assert_eq!(ev.vcpu, 1);
        }
        // Per-vector mask: masked fires become the pending bit, delivered once at unmask.
        msi.update(|c, fx| c.config_write(0x10, &0b10u32.to_le_bytes(), fx));
        msi.fire(1).unwrap();
        msi.fire(1).unwrap();
        m.control(1);
        assert_eq!(m.count(1, 0xE1), 1);
        msi.update(|c, fx| c.config_write(0x10, &0u32.to_le_bytes(), fx));
        assert_eq!(m.wait_count(1, 0xE1, 2, WAIT), 2);
        m.control(1);
        assert_eq!(m.count(1, 0xE1), 2);
    }
);
