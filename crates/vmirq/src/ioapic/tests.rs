use super::spec::{self, RedirectionEntry};
use super::*;
use crate::msi::{DeliveryMode, X86Msi};

mod invariants;

const PINS: u32 = 24;

fn select(io: &mut Ioapic, reg: u8) {
    let mut fx = Effects::default();
    io.mmio_write(spec::IOREGSEL, &[reg], &mut fx);
    assert!(fx.is_empty());
}

fn read_reg(io: &mut Ioapic, reg: u8) -> u32 {
    select(io, reg);
    let mut data = [0u8; 4];
    io.mmio_read(spec::IOWIN, &mut data);
    u32::from_le_bytes(data)
}

fn write_reg(io: &mut Ioapic, reg: u8, value: u32, fx: &mut Effects) {
    select(io, reg);
    io.mmio_write(spec::IOWIN, &value.to_le_bytes(), fx);
}

/// Writes `entry` the way Linux does: high dword first, so an unmask sees the destination.
fn program(io: &mut Ioapic, pin: u32, entry: RedirectionEntry) -> Effects {
    let mut fx = Effects::default();
    let reg = spec::redirection_low(pin).unwrap();
    write_reg(io, reg + 1, entry.high(), &mut fx);
    write_reg(io, reg, entry.low(), &mut fx);
    fx
}

fn level(vector: u8) -> RedirectionEntry {
    RedirectionEntry::RESET
        .with_masked(false)
        .with_trigger_level(true)
        .with_vector(vector)
        .with_destination(1)
}

fn edge(vector: u8) -> RedirectionEntry {
    level(vector).with_trigger_level(false)
}

fn delivered(fx: &Effects) -> Vec<u32> {
    fx.deliver.iter().map(|(pin, _)| *pin).collect()
}

fn set_line(io: &mut Ioapic, pin: u32, level: bool) -> Effects {
    let mut fx = Effects::default();
    io.set_line(pin, level, &mut fx);
    fx
}

fn set_resampled(io: &mut Ioapic, pin: u32, level: bool) -> Effects {
    let mut fx = Effects::default();
    io.set_resampled_line(pin, level, &mut fx);
    fx
}

fn eoi(io: &mut Ioapic, vector: u8) -> Effects {
    let mut fx = Effects::default();
    io.eoi(vector, &mut fx);
    fx
}

#[test]
fn reset_state_is_all_masked_with_id_0() {
    let mut io = Ioapic::new(PINS);
    for pin in 0..PINS {
        assert_eq!(io.entry(pin), Some(RedirectionEntry::RESET));
        assert_eq!(io.entry(pin).unwrap().bits(), 1 << 16);
    }
    assert_eq!(read_reg(&mut io, spec::REG_ID), 0);
    assert!(set_line(&mut io, 3, true).deliver.is_empty());
}

#[test]
fn pin_count_is_clamped_to_what_ioregsel_can_reach() {
    assert_eq!(Ioapic::new(0).pins(), 1);
    assert_eq!(Ioapic::new(24).pins(), 24);
    assert_eq!(Ioapic::new(240).pins(), MAX_PINS);
    assert_eq!(MAX_PINS, 120);
    let mut io = Ioapic::new(u32::MAX);
    // The last pin's high dword is register 0xFF.
    let mut fx = Effects::default();
    write_reg(&mut io, 0xFF, 0xAB00_0000, &mut fx);
    assert_eq!(io.entry(MAX_PINS - 1).unwrap().destination(), 0xAB);
}

#[test]
fn version_register_reports_max_redirection_entry() {
    let mut io = Ioapic::new(PINS);
    assert_eq!(read_reg(&mut io, spec::REG_VERSION), 0x0017_0011);
    assert_eq!(read_reg(&mut Ioapic::new(1), spec::REG_VERSION), 0x11);
    assert_eq!(
        read_reg(&mut Ioapic::new(120), spec::REG_VERSION),
        0x0077_0011
    );
}

#[test]
fn id_register_keeps_bits_27_to_24_and_arbitration_mirrors_it() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    write_reg(&mut io, spec::REG_ID, 0xFFFF_FFFF, &mut fx);
    assert_eq!(read_reg(&mut io, spec::REG_ID), 0x0F00_0000);
    assert_eq!(read_reg(&mut io, spec::REG_ARBITRATION), 0x0F00_0000);
    assert!(fx.is_empty());
}

#[test]
fn reserved_register_writes_are_ignored() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    for reg in [
        spec::REG_VERSION,
        spec::REG_ARBITRATION,
        0x03,
        0x0F,
        0x10 + 2 * PINS as u8,
        0xFF,
    ] {
        write_reg(&mut io, reg, 0, &mut fx);
    }
    assert!(fx.is_empty());
    assert_eq!(read_reg(&mut io, spec::REG_VERSION), 0x0017_0011);
    assert_eq!(read_reg(&mut io, spec::REG_ARBITRATION), 0);
    for pin in 0..PINS {
        assert_eq!(io.entry(pin), Some(RedirectionEntry::RESET));
    }
}

#[test]
fn unknown_registers_read_all_ones() {
    let mut io = Ioapic::new(PINS);
    assert_eq!(read_reg(&mut io, 0x03), !0);
    assert_eq!(read_reg(&mut io, 0x0F), !0);
    assert_eq!(read_reg(&mut io, 0x10 + 2 * PINS as u8), !0);
    assert_eq!(read_reg(&mut io, 0xFF), !0);
}

#[test]
fn redirection_entry_reads_back_what_was_written() {
    let mut io = Ioapic::new(PINS);
    let entry = level(0x41).with_dest_logical(true).with_active_low(true);
    program(&mut io, 5, entry);
    assert_eq!(read_reg(&mut io, 0x10 + 10), entry.low());
    assert_eq!(read_reg(&mut io, 0x10 + 11), entry.high());
    assert_eq!(io.entry(5), Some(entry));
}

#[test]
fn read_only_bits_stay_read_only() {
    let mut io = Ioapic::new(PINS);
    // Delivery status (12), remote IRR (14) and reserved bits cannot be set by the guest.
    let mut fx = Effects::default();
    write_reg(&mut io, 0x10, !(1 << 16), &mut fx);
    write_reg(&mut io, 0x11, 0xFFFF_FFFF, &mut fx);
    let e = io.entry(0).unwrap();
    assert!(!e.delivery_status());
    assert!(!e.remote_irr());
    assert_eq!(e.low(), 0x0000_AFFF);
    assert_eq!(
        e.high(),
        0xFFFE_0000,
        "bit 48 (remappable format) and 47:17 are reserved"
    );

    // And a set remote IRR survives a guest write that tries to clear it.
    program(&mut io, 1, level(0x31));
    set_line(&mut io, 1, true);
    assert!(io.remote_irr(1));
    write_reg(&mut io, 0x12, level(0x31).low() & !(1 << 14), &mut fx);
    assert!(io.remote_irr(1));
    assert!(!io.entry(1).unwrap().delivery_status());
}

#[test]
fn level_pin_delivers_once_until_eoi() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 9, level(0x39));
    let fx = set_line(&mut io, 9, true);
    assert_eq!(fx.deliver, vec![(9, io.pin_msi(9).unwrap())]);
    assert!(io.remote_irr(9));
    // Re-asserting (another source) while Remote IRR is set does not deliver again.
    assert!(set_line(&mut io, 9, true).deliver.is_empty());
    assert!(set_line(&mut io, 9, false).is_empty());
    assert!(io.remote_irr(9), "de-assertion does not clear Remote IRR");
    let fx = eoi(&mut io, 0x39);
    assert!(fx.deliver.is_empty());
    assert_eq!(fx.resample, vec![9]);
    assert!(!io.remote_irr(9));
}

#[test]
fn eoi_with_line_still_high_redelivers() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 2, level(0x32));
    set_line(&mut io, 2, true);
    let fx = eoi(&mut io, 0x32);
    assert_eq!(delivered(&fx), vec![2]);
    assert_eq!(fx.resample, vec![2]);
    assert!(io.remote_irr(2));
}

#[test]
fn deassert_and_reassert_racing_the_eoi_is_not_lost() {
    // Cloud Hypervisor #5260: the device drops and raises its line before the guest's EOI.
    let mut io = Ioapic::new(PINS);
    program(&mut io, 4, level(0x44));
    set_line(&mut io, 4, true);
    set_line(&mut io, 4, false);
    assert!(set_line(&mut io, 4, true).deliver.is_empty());
    assert_eq!(delivered(&eoi(&mut io, 0x44)), vec![4]);
    // And an assertion right after an EOI that found the line low delivers too.
    set_line(&mut io, 4, false);
    assert!(eoi(&mut io, 0x44).deliver.is_empty());
    assert_eq!(delivered(&set_line(&mut io, 4, true)), vec![4]);
}

#[test]
fn eoi_of_another_vector_changes_nothing() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 1, level(0x31));
    set_line(&mut io, 1, true);
    assert!(eoi(&mut io, 0x32).is_empty());
    assert!(io.remote_irr(1));
}

#[test]
fn eoi_acknowledges_every_pending_pin_of_the_vector() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 1, level(0x50));
    program(&mut io, 7, level(0x50));
    set_line(&mut io, 1, true);
    set_line(&mut io, 7, true);
    set_line(&mut io, 7, false);
    let fx = eoi(&mut io, 0x50);
    assert_eq!(fx.resample, vec![1, 7]);
    assert_eq!(delivered(&fx), vec![1]);
}

#[test]
fn edge_pin_delivers_on_rising_edges_only() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 3, edge(0x33));
    assert_eq!(delivered(&set_line(&mut io, 3, true)), vec![3]);
    assert!(set_line(&mut io, 3, true).deliver.is_empty(), "no edge");
    assert!(!io.remote_irr(3));
    assert!(eoi(&mut io, 0x33).is_empty(), "edge pins wait for no EOI");
    set_line(&mut io, 3, false);
    assert_eq!(delivered(&set_line(&mut io, 3, true)), vec![3]);
    assert!(!io.pin_msi(3).unwrap().is_level());
}

#[test]
fn masked_edge_is_dropped_not_latched() {
    // 82093AA §3.2.4 "Edge-sensitive interrupts signaled on a masked interrupt pin are
    // ignored"; Linux (unmask services level pins only) and QEMU agree.
    let mut io = Ioapic::new(PINS);
    program(&mut io, 6, edge(0x36).with_masked(true));
    assert!(set_line(&mut io, 6, true).deliver.is_empty());
    set_line(&mut io, 6, false);
    assert!(program(&mut io, 6, edge(0x36)).deliver.is_empty());
    assert_eq!(delivered(&set_line(&mut io, 6, true)), vec![6]);
}

#[test]
fn masked_level_is_delivered_on_unmask() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 8, level(0x38).with_masked(true));
    assert!(set_line(&mut io, 8, true).deliver.is_empty());
    assert!(!io.remote_irr(8));
    let fx = program(&mut io, 8, level(0x38));
    assert_eq!(delivered(&fx), vec![8]);
    assert!(
        fx.resample.is_empty(),
        "a plain source's level is current, not stale"
    );
    assert!(io.remote_irr(8));
}

#[test]
fn masked_level_that_fell_is_not_delivered_on_unmask() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 8, level(0x38).with_masked(true));
    set_line(&mut io, 8, true);
    set_line(&mut io, 8, false);
    assert!(program(&mut io, 8, level(0x38)).deliver.is_empty());
}

#[test]
fn resampled_source_is_deasserted_by_eoi_without_redelivery() {
    // Linux irqfd resampler: on ack, de-assert and notify; the device re-asserts if needed.
    let mut io = Ioapic::new(PINS);
    program(&mut io, 10, level(0x3a));
    assert_eq!(delivered(&set_resampled(&mut io, 10, true)), vec![10]);
    let fx = eoi(&mut io, 0x3a);
    assert_eq!(fx.resample, vec![10]);
    assert!(
        fx.deliver.is_empty(),
        "no spurious re-delivery of the acknowledged level"
    );
    assert!(!io.line(10));
    assert!(!io.resampled_line(10));
    // Still pending at the device: it signals again and is delivered.
    assert_eq!(delivered(&set_resampled(&mut io, 10, true)), vec![10]);
}

#[test]
fn unmask_with_stale_level_notifies_resampler() {
    // Linux ioapic_write_indirect (IRQF_ONESHOT): the guest EOIs with the pin masked, acks the
    // device in its threaded handler, then unmasks. The resampled level is stale by then.
    let mut io = Ioapic::new(PINS);
    program(&mut io, 11, level(0x3b));
    set_resampled(&mut io, 11, true);
    program(&mut io, 11, level(0x3b).with_masked(true));
    let fx = eoi(&mut io, 0x3b);
    assert_eq!(fx.resample, vec![11]);
    // The device was not serviced yet, so it re-asserts while the pin is masked.
    assert!(set_resampled(&mut io, 11, true).deliver.is_empty());
    let fx = program(&mut io, 11, level(0x3b));
    assert_eq!(fx.resample, vec![11]);
    assert!(
        fx.deliver.is_empty(),
        "no injection of a possibly stale level"
    );
    assert!(!io.line(11));
    assert!(!io.remote_irr(11));
}

#[test]
fn resampled_source_can_be_released_without_ack() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 12, level(0x3c).with_masked(true));
    set_resampled(&mut io, 12, true);
    assert!(set_resampled(&mut io, 12, false).is_empty());
    assert!(program(&mut io, 12, level(0x3c)).deliver.is_empty());
}

#[test]
fn switching_to_edge_clears_remote_irr() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 5, level(0x35));
    set_line(&mut io, 5, true);
    set_line(&mut io, 5, false);
    assert!(io.remote_irr(5));
    let fx = program(&mut io, 5, edge(0x35));
    assert!(!io.remote_irr(5));
    assert!(fx.deliver.is_empty());
    assert_eq!(fx.routes_changed, vec![5], "the MSI lost its level bits");
    // Back to level: nothing pending, so the next assertion delivers.
    program(&mut io, 5, level(0x35));
    assert_eq!(delivered(&set_line(&mut io, 5, true)), vec![5]);
}

#[test]
fn nmi_programmed_level_behaves_as_edge() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 2, level(0).with_delivery_mode(DeliveryMode::Nmi));
    assert_eq!(delivered(&set_line(&mut io, 2, true)), vec![2]);
    assert!(!io.remote_irr(2));
    assert!(!io.pin_msi(2).unwrap().is_level());
    assert!(set_line(&mut io, 2, true).deliver.is_empty());
}

#[test]
fn storm_guard_defers_after_limit() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 0, level(0x30));
    set_line(&mut io, 0, true);
    for _ in 1..REDELIVERY_STORM_LIMIT {
        let fx = eoi(&mut io, 0x30);
        assert_eq!(delivered(&fx), vec![0]);
        assert!(fx.deferred.is_empty());
    }
    let fx = eoi(&mut io, 0x30);
    assert!(fx.deliver.is_empty());
    assert_eq!(fx.deferred, vec![0]);
    assert!(!io.remote_irr(0));
    let mut fx = Effects::default();
    io.redeliver_deferred(0, &mut fx);
    assert_eq!(delivered(&fx), vec![0]);
    // The count started over.
    assert_eq!(delivered(&eoi(&mut io, 0x30)), vec![0]);
}

#[test]
fn storm_count_resets_when_an_eoi_finds_the_line_low() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 0, level(0x30));
    set_line(&mut io, 0, true);
    for _ in 0..REDELIVERY_STORM_LIMIT - 2 {
        eoi(&mut io, 0x30);
    }
    set_line(&mut io, 0, false);
    eoi(&mut io, 0x30);
    set_line(&mut io, 0, true);
    for _ in 1..REDELIVERY_STORM_LIMIT {
        assert!(eoi(&mut io, 0x30).deferred.is_empty());
    }
    assert_eq!(eoi(&mut io, 0x30).deferred, vec![0]);
}

#[test]
fn redeliver_deferred_is_harmless_at_other_times() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 1, level(0x31));
    let mut fx = Effects::default();
    io.redeliver_deferred(1, &mut fx);
    io.redeliver_deferred(PINS, &mut fx);
    set_line(&mut io, 1, true);
    io.redeliver_deferred(1, &mut fx);
    assert!(fx.is_empty());
}

#[test]
fn routes_change_only_when_the_msi_or_mask_changes() {
    let mut io = Ioapic::new(PINS);
    let entry = level(0x40);
    assert_eq!(program(&mut io, 3, entry).routes_changed, vec![3, 3]);
    assert!(program(&mut io, 3, entry).routes_changed.is_empty());
    assert!(program(&mut io, 3, entry.with_active_low(true))
        .routes_changed
        .is_empty());
    let fx = program(&mut io, 3, entry.with_masked(true));
    assert_eq!(fx.routes_changed, vec![3]);
    let fx = program(&mut io, 3, entry.with_masked(true).with_vector(0x41));
    assert_eq!(fx.routes_changed, vec![3]);
}

#[test]
fn pin_msi_encodes_the_entry() {
    let mut io = Ioapic::new(PINS);
    let entry = level(0x61)
        .with_destination(0x23)
        .with_extended_destination(0x05)
        .with_dest_logical(true)
        .with_delivery_mode(DeliveryMode::LowestPriority)
        .with_masked(true);
    program(&mut io, 13, entry);
    let expected = X86Msi {
        dest_id: 0x523,
        redirection_hint: false,
        dest_logical: true,
        vector: 0x61,
        delivery_mode: DeliveryMode::LowestPriority,
        level_assert: true,
        trigger_level: true,
    };
    assert_eq!(io.pin_msi(13), Some(expected.encode().unwrap()));
    assert_eq!(io.pin_msi(13).unwrap().decode(), Ok(expected));
    assert_eq!(io.pin_msi(PINS), None);
}

#[test]
fn out_of_range_pins_are_ignored() {
    let mut io = Ioapic::new(PINS);
    for pin in [PINS, PINS + 1, u32::MAX] {
        assert!(set_line(&mut io, pin, true).is_empty());
        assert!(set_resampled(&mut io, pin, true).is_empty());
        let mut fx = Effects::default();
        io.redeliver_deferred(pin, &mut fx);
        assert!(fx.is_empty());
        assert_eq!(io.entry(pin), None);
        assert!(!io.line(pin) && !io.remote_irr(pin));
    }
}

#[test]
fn reset_masks_every_pin_and_keeps_line_levels() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    write_reg(&mut io, spec::REG_ID, 0x0300_0000, &mut fx);
    program(&mut io, 1, level(0x31));
    set_line(&mut io, 1, true);
    io.reset();
    assert_eq!(io.entry(1), Some(RedirectionEntry::RESET));
    assert!(!io.remote_irr(1));
    assert!(io.line(1));
    assert_eq!(read_reg(&mut io, spec::REG_ID), 0);
    assert_eq!(delivered(&program(&mut io, 1, level(0x31))), vec![1]);
}

#[test]
fn ioregsel_reads_back_and_takes_the_low_byte() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    io.mmio_write(0, &0x1234_5617u32.to_le_bytes(), &mut fx);
    let mut data = [0u8; 4];
    io.mmio_read(0, &mut data);
    assert_eq!(u32::from_le_bytes(data), 0x17);
    io.mmio_write(0x100, &[0x01], &mut fx);
    io.mmio_read(0x110, &mut data);
    assert_eq!(
        u32::from_le_bytes(data),
        0x0017_0011,
        "aliased every 256 bytes"
    );
}

#[test]
fn narrow_iowin_writes_are_ignored_and_wide_reads_zero_extend() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    select(&mut io, 0x10);
    io.mmio_write(spec::IOWIN, &[0x30], &mut fx);
    io.mmio_write(spec::IOWIN, &[0x30, 0x00], &mut fx);
    assert_eq!(
        io.entry(0),
        Some(RedirectionEntry::RESET),
        "a byte write would unmask"
    );
    io.mmio_write(
        spec::IOWIN,
        &0xAAAA_0000_0000_0030u64.to_le_bytes(),
        &mut fx,
    );
    assert_eq!(
        io.entry(0).unwrap().low(),
        0x30,
        "8-byte writes use the low dword"
    );
    let mut data = [0xEEu8; 8];
    select(&mut io, spec::REG_VERSION);
    io.mmio_read(spec::IOWIN, &mut data);
    assert_eq!(u64::from_le_bytes(data), 0x0017_0011);
    let mut byte = [0u8; 1];
    io.mmio_read(spec::IOWIN, &mut byte);
    assert_eq!(byte, [0x11]);
}

#[test]
fn unaligned_and_odd_size_accesses_do_not_panic() {
    let mut io = Ioapic::new(PINS);
    let mut fx = Effects::default();
    for offset in [
        0,
        1,
        3,
        0xf,
        0x10,
        0x11,
        0x13,
        0x40,
        0xff,
        0xffc,
        0xfff,
        0x1000,
        u64::MAX,
    ] {
        for len in 0..=16 {
            let mut data = vec![0x5a; len];
            io.mmio_read(offset, &mut data);
            if offset >= IOAPIC_MMIO_SIZE || !matches!(len, 0 | 1 | 2 | 4 | 8) {
                assert!(
                    data.iter().all(|b| *b == 0xff),
                    "{offset:#x}/{len}: {data:?}"
                );
            }
            io.mmio_write(offset, &vec![0; len], &mut fx);
        }
    }
    let mut data = [0u8; 4];
    io.mmio_read(0x20, &mut data);
    assert_eq!(
        data, [0; 4],
        "unknown offsets in the region read 0, as in Linux and QEMU"
    );
}

#[test]
fn effects_clear_and_is_empty() {
    let mut fx = Effects {
        routes_changed: vec![1],
        deliver: vec![(0, MsiMessage::default())],
        resample: vec![2],
        deferred: vec![3],
    };
    assert!(!fx.is_empty());
    fx.clear();
    assert!(fx.is_empty());
    assert_eq!(fx, Effects::default());
}

// Tests written to kill mutants cargo-mutants found surviving (docs/mutants.md).

#[test]
fn effects_are_empty_only_when_every_list_is() {
    assert!(Effects::default().is_empty());
    let msg = X86Msi::fixed(0, 0x40).encode().unwrap();
    let mut each = [
        Effects::default(),
        Effects::default(),
        Effects::default(),
        Effects::default(),
    ];
    each[0].routes_changed.push(1);
    each[1].deliver.push((1, msg));
    each[2].resample.push(1);
    each[3].deferred.push(1);
    for (i, fx) in each.iter_mut().enumerate() {
        assert!(!fx.is_empty(), "list {i} alone");
        fx.clear();
        assert!(fx.is_empty(), "list {i} cleared");
    }
}

#[test]
fn an_eoi_for_a_level_pin_with_nothing_pending_only_notifies_its_resamplers() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 3, level(0x60));
    program(&mut io, 4, edge(0x60));
    // Never asserted, so never delivered here (the vector came another way): KVM and QEMU
    // still run the level pin's ack notifiers; nothing is delivered, no Remote IRR appears,
    // and the edge pin of the same vector is not acknowledged.
    let fx = eoi(&mut io, 0x60);
    assert_eq!(fx.resample, [3]);
    assert!(fx.deliver.is_empty() && fx.deferred.is_empty());
    assert!(!io.remote_irr(3));
}

#[test]
fn the_resampled_input_reads_back() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 4, level(0x61).with_masked(true));
    assert!(!io.resampled_line(4));
    set_resampled(&mut io, 4, true);
    assert!(io.resampled_line(4) && io.line(4));
    set_resampled(&mut io, 4, false);
    assert!(!io.resampled_line(4));
    assert!(!io.resampled_line(PINS), "out of range reads false");
}

#[test]
fn rewriting_a_pending_level_entry_keeps_remote_irr_and_edge_clears_it() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 5, level(0x62));
    assert_eq!(delivered(&set_line(&mut io, 5, true)), [5]);
    assert!(io.remote_irr(5));
    // The guest moves the pending level pin to another CPU: still waiting for its EOI, so no
    // second delivery.
    let fx = program(&mut io, 5, level(0x62).with_destination(2));
    assert!(io.remote_irr(5), "a level rewrite cleared Remote IRR");
    assert!(delivered(&fx).is_empty());
    // Switched to edge, Remote IRR goes (Linux clears it for IOAPICs without an EOI register).
    program(&mut io, 5, edge(0x62));
    assert!(!io.remote_irr(5));
}

#[test]
fn the_guest_can_write_every_delivery_mode() {
    let mut io = Ioapic::new(PINS);
    for mode in [
        DeliveryMode::Fixed,
        DeliveryMode::LowestPriority,
        DeliveryMode::Nmi,
        DeliveryMode::ExtInt,
    ] {
        program(&mut io, 6, edge(0x63).with_delivery_mode(mode));
        assert_eq!(io.entry(6).unwrap().delivery_mode(), mode);
    }
}

#[test]
fn redirection_registers_end_where_an_8_bit_ioregsel_does() {
    assert_eq!(spec::redirection_low(0), Some(0x10));
    assert_eq!(spec::redirection_low(spec::MAX_PINS - 1), Some(0xFE));
    assert_eq!(spec::redirection_low(spec::MAX_PINS), None);
}

#[test]
fn every_entry_field_reads_back_what_was_set() {
    let e = RedirectionEntry::RESET;
    for on in [false, true] {
        assert_eq!(e.with_dest_logical(on).dest_logical(), on);
        assert_eq!(e.with_active_low(on).active_low(), on);
        assert_eq!(e.with_trigger_level(on).trigger_level(), on);
        assert_eq!(e.with_masked(on).masked(), on);
        // Setting a bit that is already set keeps it (and clearing a clear one keeps it clear).
        assert_eq!(e.with_masked(on).with_masked(on).masked(), on);
        assert_eq!(e.with_active_low(on).with_active_low(on).active_low(), on);
    }
    assert!(RedirectionEntry::from_bits(1 << 12).delivery_status());
    assert!(!e.delivery_status());
    assert!(RedirectionEntry::from_bits(1 << 11).dest_logical());
    assert!(!RedirectionEntry::from_bits(!(1 << 11)).dest_logical());
    assert!(!RedirectionEntry::from_bits(!(1 << 13)).active_low());
    let debug = format!("{:?}", level(0x64));
    assert!(
        debug.contains("RedirectionEntry") && debug.contains("0x64"),
        "{debug}"
    );
}

#[test]
fn unmasking_a_level_pin_known_only_through_the_resampler_acks_it_instead_of_injecting() {
    let mut io = Ioapic::new(PINS);
    program(&mut io, 7, level(0x65).with_masked(true));
    assert!(delivered(&set_resampled(&mut io, 7, true)).is_empty());
    // Rewriting it still masked changes nothing.
    let fx = program(
        &mut io,
        7,
        level(0x65).with_masked(true).with_destination(2),
    );
    assert!(fx.resample.is_empty() && io.resampled_line(7));
    // Unmasked: acknowledged to the resampler (Linux ioapic_write_indirect), not delivered.
    let fx = program(&mut io, 7, level(0x65));
    assert_eq!(fx.resample, [7]);
    assert!(delivered(&fx).is_empty());
    assert!(!io.resampled_line(7));
}
