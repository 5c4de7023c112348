use super::spec;
use super::*;
use crate::msi::{MsiMessage, X86Msi};

mod invariants;

const ENABLE: u16 = spec::MSIX_CTRL_ENABLE;
const FMASK: u16 = spec::MSIX_CTRL_FUNCTION_MASK;

fn control(t: &mut MsixTable, value: u16) -> VectorEffects {
    let mut fx = VectorEffects::default();
    t.write_message_control(value, &mut fx);
    fx
}

fn write32(t: &mut MsixTable, offset: u64, value: u32) -> VectorEffects {
    let mut fx = VectorEffects::default();
    t.table_write(offset, &value.to_le_bytes(), &mut fx);
    fx
}

fn read32(t: &MsixTable, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    t.table_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn pba64(t: &MsixTable, offset: u64) -> u64 {
    let mut data = [0u8; 8];
    t.pba_read(offset, &mut data);
    u64::from_le_bytes(data)
}

fn entry(v: u16, field: u64) -> u64 {
    u64::from(v) * ENTRY_SIZE + field
}

/// Programs vector `v` the way Linux does: message while masked, then unmask.
fn program(t: &mut MsixTable, v: u16, msg: MsiMessage) -> VectorEffects {
    let mut fx = VectorEffects::default();
    t.table_write(
        entry(v, spec::ENTRY_ADDRESS_LO),
        &msg.address.to_le_bytes(),
        &mut fx,
    );
    t.table_write(entry(v, spec::ENTRY_DATA), &msg.data.to_le_bytes(), &mut fx);
    t.table_write(
        entry(v, spec::ENTRY_VECTOR_CONTROL),
        &0u32.to_le_bytes(),
        &mut fx,
    );
    fx
}

fn msg(vector: u8) -> MsiMessage {
    X86Msi::fixed(0, vector).encode().unwrap()
}

#[test]
fn every_vector_is_masked_at_reset() {
    let mut t = MsixTable::new(2048);
    assert_eq!(t.vectors(), 2048);
    assert!(!t.is_enabled() && !t.function_masked());
    for v in 0..2048 {
        assert!(t.entry_masked(v) && t.is_masked(v));
        assert_eq!(read32(&t, entry(v, spec::ENTRY_VECTOR_CONTROL)), 1);
        assert_eq!(t.message(v), Some(MsiMessage::default()));
    }
    assert_eq!(t.pending_vectors().count(), 0);
    // Enabling with every entry masked unmasks nothing.
    assert!(control(&mut t, ENABLE).is_empty());
    assert!(t.is_masked(0));
}

#[test]
fn vector_count_is_clamped_and_sizes_follow() {
    assert_eq!(MsixTable::new(0).vectors(), 1);
    assert_eq!(MsixTable::new(5000).vectors(), MAX_VECTORS);
    let t = MsixTable::new(65);
    assert_eq!(t.table_bytes(), 65 * 16);
    assert_eq!(t.pba_bytes(), 16);
    assert_eq!(MsixTable::new(64).pba_bytes(), 8);
    assert_eq!(t.message(65), None);
    assert!(t.is_masked(65) && t.entry_masked(u16::MAX));
}

#[test]
fn table_size_is_read_only() {
    let mut t = MsixTable::new(17);
    assert_eq!(t.message_control(), 16);
    control(&mut t, 0xffff);
    assert_eq!(t.message_control(), 16 | ENABLE | FMASK);
    control(&mut t, 0x3fff);
    assert_eq!(t.message_control(), 16, "reserved bits 13:11 read 0");
}

#[test]
fn enable_unmasks_entry_unmasked_vectors_and_disable_reports_only_disabled() {
    let mut t = MsixTable::new(8);
    assert!(program(&mut t, 2, msg(0x40)).is_empty(), "MSI-X disabled");
    program(&mut t, 5, msg(0x41));
    let fx = control(&mut t, ENABLE);
    assert_eq!(fx.unmasked, [2, 5]);
    assert!(fx.masked.is_empty() && !fx.disabled);
    assert!(!t.is_masked(2) && t.is_masked(3));

    let fx = control(&mut t, 0);
    assert_eq!(
        fx,
        VectorEffects {
            disabled: true,
            ..Default::default()
        }
    );
    assert!(t.is_masked(2));
}

#[test]
fn enable_with_function_mask_set_unmasks_nothing() {
    let mut t = MsixTable::new(4);
    program(&mut t, 1, msg(0x40));
    assert!(control(&mut t, ENABLE | FMASK).is_empty());
    assert!(t.is_masked(1) && !t.entry_masked(1));
    assert_eq!(control(&mut t, ENABLE).unmasked, [1]);
}

#[test]
fn function_mask_set_masks_every_deliverable_vector_in_one_effect() {
    let mut t = MsixTable::new(2048);
    control(&mut t, ENABLE);
    for v in (0..2048).step_by(3) {
        program(&mut t, v, msg(0x40));
    }
    let fx = control(&mut t, ENABLE | FMASK);
    assert_eq!(fx.masked, (0..2048).step_by(3).collect::<Vec<u16>>());
    assert!(fx.unmasked.is_empty());
    // Writing the same value again changes nothing.
    assert!(control(&mut t, ENABLE | FMASK).is_empty());
}

#[test]
fn function_mask_clear_unmasks_all_entry_unmasked_vectors_in_one_effect() {
    let mut t = MsixTable::new(2048);
    control(&mut t, ENABLE | FMASK);
    for v in 0..2048 {
        // Entry writes under the function mask report nothing: nothing is deliverable.
        assert!(program(&mut t, v, msg((v % 200) as u8 + 0x20)).is_empty());
    }
    write32(&mut t, entry(7, spec::ENTRY_VECTOR_CONTROL), 1);
    let fx = control(&mut t, ENABLE);
    let expected: Vec<u16> = (0..2048).filter(|&v| v != 7).collect();
    assert_eq!(fx.unmasked, expected);
    assert!(fx.masked.is_empty() && fx.message_changed.is_empty() && !fx.disabled);
}

#[test]
fn entry_mask_bit_flips_report_one_vector() {
    let mut t = MsixTable::new(4);
    control(&mut t, ENABLE);
    assert_eq!(program(&mut t, 3, msg(0x50)).unmasked, [3]);
    assert_eq!(
        write32(&mut t, entry(3, spec::ENTRY_VECTOR_CONTROL), 1).masked,
        [3]
    );
    assert!(write32(&mut t, entry(3, spec::ENTRY_VECTOR_CONTROL), 1).is_empty());
    assert_eq!(
        write32(&mut t, entry(3, spec::ENTRY_VECTOR_CONTROL), 0).unmasked,
        [3]
    );
}

#[test]
fn changing_a_deliverable_message_reports_message_changed() {
    let mut t = MsixTable::new(4);
    control(&mut t, ENABLE);
    program(&mut t, 0, msg(0x40));
    let fx = write32(&mut t, entry(0, spec::ENTRY_DATA), 0x41);
    assert_eq!(fx.message_changed, [0]);
    assert!(
        write32(&mut t, entry(0, spec::ENTRY_DATA), 0x41).is_empty(),
        "same value"
    );
    // A masked vector's message changes silently: the route is built on unmask.
    write32(&mut t, entry(0, spec::ENTRY_VECTOR_CONTROL), 1);
    assert!(write32(&mut t, entry(0, spec::ENTRY_DATA), 0x42).is_empty());
}

#[test]
fn vector_control_reserved_bits_read_zero() {
    let mut t = MsixTable::new(2);
    write32(&mut t, entry(1, spec::ENTRY_VECTOR_CONTROL), 0xffff_fffe);
    assert_eq!(read32(&t, entry(1, spec::ENTRY_VECTOR_CONTROL)), 0);
    assert!(!t.entry_masked(1));
    write32(&mut t, entry(1, spec::ENTRY_VECTOR_CONTROL), 0xffff_ffff);
    assert_eq!(read32(&t, entry(1, spec::ENTRY_VECTOR_CONTROL)), 1);
}

#[test]
fn unaligned_or_odd_sized_table_accesses_read_all_ones_and_write_nothing() {
    let mut t = MsixTable::new(2);
    control(&mut t, ENABLE);
    program(&mut t, 0, msg(0x40));
    let before = t.clone();
    for (offset, len) in [
        (0, 1),
        (0, 2),
        (1, 4),
        (2, 4),
        (4, 8),
        (12, 8),
        (0, 3),
        (0, 16),
        (32, 4),
        (28, 8),
        (u64::MAX - 3, 4),
        (u64::MAX - 7, 8),
    ] {
        let mut data = vec![0u8; len];
        t.table_read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0xff), "read {offset:#x}/{len}");
        let mut fx = VectorEffects::default();
        t.table_write(offset, &vec![0x5a; len], &mut fx);
        assert!(fx.is_empty(), "write {offset:#x}/{len}");
    }
    for v in 0..2 {
        assert_eq!(t.message(v), before.message(v));
        assert_eq!(t.entry_masked(v), before.entry_masked(v));
    }
    let mut empty = [];
    t.table_read(0, &mut empty);
}

#[test]
fn qword_write_sets_address_and_data() {
    let mut t = MsixTable::new(2);
    let mut fx = VectorEffects::default();
    t.table_write(entry(1, 0), &0x1_FEE0_1000u64.to_le_bytes(), &mut fx);
    // Data 0x41 and vector control 0 (unmask) in one qword.
    t.table_write(entry(1, 8), &0x41u64.to_le_bytes(), &mut fx);
    assert!(fx.is_empty(), "MSI-X disabled");
    assert_eq!(t.message(1), Some(MsiMessage::new(0x1_FEE0_1000, 0x41)));
    assert!(!t.entry_masked(1));
    let mut data = [0u8; 8];
    t.table_read(entry(1, 0), &mut data);
    assert_eq!(u64::from_le_bytes(data), 0x1_FEE0_1000);
    t.table_read(entry(1, 8), &mut data);
    assert_eq!(u64::from_le_bytes(data), 0x41);

    // Enabled: a qword that masks and rewrites data reports only the mask.
    control(&mut t, ENABLE);
    t.table_write(entry(1, 8), &(1u64 << 32 | 0x42).to_le_bytes(), &mut fx);
    assert_eq!(fx.masked, [1]);
    assert!(fx.message_changed.is_empty());
    fx.clear();
    t.table_write(entry(1, 8), &0x43u64.to_le_bytes(), &mut fx);
    assert_eq!(fx.unmasked, [1]);
    assert!(
        fx.message_changed.is_empty(),
        "unmasked implies a fresh route"
    );
}

#[test]
fn pba_reflects_set_pending_and_is_read_only() {
    let mut t = MsixTable::new(100);
    for v in [0, 63, 64, 99] {
        t.set_pending(v, true);
    }
    t.set_pending(100, true); // out of range: ignored
    t.set_pending(u16::MAX, true);
    assert_eq!(pba64(&t, 0), 1 | 1 << 63);
    assert_eq!(pba64(&t, 8), 1 | 1 << 35);
    let mut dword = [0u8; 4];
    t.pba_read(12, &mut dword);
    assert_eq!(u32::from_le_bytes(dword), 1 << 3);
    assert_eq!(t.pending_vectors().collect::<Vec<_>>(), [0, 63, 64, 99]);
    assert!(t.is_pending(99) && !t.is_pending(100));

    t.pba_write(0, &[0; 8]);
    assert_eq!(pba64(&t, 0), 1 | 1 << 63);
    for (offset, len) in [(16, 4), (4, 8), (2, 4), (0, 2)] {
        let mut data = vec![0u8; len];
        t.pba_read(offset, &mut data);
        assert!(data.iter().all(|&b| b == 0xff));
    }
    t.set_pending(63, false);
    assert_eq!(pba64(&t, 0), 1);
}

#[test]
fn pending_survives_mask_and_unmask() {
    let mut t = MsixTable::new(4);
    control(&mut t, ENABLE);
    program(&mut t, 2, msg(0x40));
    write32(&mut t, entry(2, spec::ENTRY_VECTOR_CONTROL), 1);
    t.set_pending(2, true);
    let fx = write32(&mut t, entry(2, spec::ENTRY_VECTOR_CONTROL), 0);
    assert_eq!(fx.unmasked, [2]);
    assert!(t.is_pending(2), "the manager delivers and clears it");
}

/// QEMU `msix_write_config` treats disable as a function mask: the PBA is kept, and a vector
/// still pending fires when MSI-X is enabled again. Only reset clears it.
#[test]
fn disable_reports_disabled_and_keeps_pending_like_qemu() {
    let mut t = MsixTable::new(4);
    control(&mut t, ENABLE);
    program(&mut t, 1, msg(0x40));
    t.set_pending(1, true);
    let fx = control(&mut t, 0);
    assert!(fx.disabled && fx.masked.is_empty());
    assert!(t.is_pending(1));
    assert_eq!(control(&mut t, ENABLE).unmasked, [1]);
}

#[test]
fn reset_restores_power_on_state_and_clears_pending() {
    let mut t = MsixTable::new(4);
    control(&mut t, ENABLE | FMASK);
    program(&mut t, 1, msg(0x40));
    t.set_pending(3, true);
    let mut fx = VectorEffects::default();
    t.reset(&mut fx);
    assert!(fx.disabled);
    assert_eq!(t.message_control(), 3);
    assert!((0..4).all(|v| t.entry_masked(v) && !t.is_pending(v)));
    assert_eq!(t.message(1), Some(MsiMessage::default()));
    assert!(fx.reset);
    fx.clear();
    t.reset(&mut fx);
    assert!(!fx.disabled, "already disabled");
    assert!(
        fx.reset,
        "a reset is reported even when disabled: old counts must go"
    );
}

// --------------------------------------------------------------------------------------------
// MSI
// --------------------------------------------------------------------------------------------

fn cfg_write(c: &mut MsiCapability, offset: u64, data: &[u8]) -> VectorEffects {
    let mut fx = VectorEffects::default();
    c.config_write(offset, data, &mut fx);
    fx
}

fn cfg_read32(c: &MsiCapability, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    c.config_read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn msi_control(c: &mut MsiCapability, value: u16) -> VectorEffects {
    cfg_write(c, spec::MSI_MESSAGE_CONTROL, &value.to_le_bytes())
}

#[test]
fn msi_header_and_layout_follow_the_spec() {
    let c = MsiCapability::new(8, true, true);
    // ID 5, next 0, control: MMC 3, 64-bit, per-vector mask.
    assert_eq!(cfg_read32(&c, 0), 0x05 | (3 << 1 | 1 << 7 | 1 << 8) << 16);
    assert_eq!(c.len(), 0x18);
    assert_eq!(MsiCapability::new(1, false, false).len(), 0x0C);
    let mut b = [0u8; 2];
    c.config_read(0x17, &mut b);
    assert_eq!(b, [0, 0xff], "bytes past the capability read all-ones");
    let mut c = MsiCapability::new(1, false, false);
    c.set_next(0x70);
    let mut byte = [0u8];
    c.config_read(1, &mut byte);
    assert_eq!(byte, [0x70]);
    cfg_write(&mut c, 0, &[0xff, 0xff]);
    assert_eq!(
        cfg_read32(&c, 0) & 0xffff,
        0x7005,
        "ID and next are read-only"
    );
}

#[test]
fn msi_multiple_message_enable_is_clamped_to_capable() {
    let mut c = MsiCapability::new(6, false, false); // rounds down to 4
    assert_eq!(c.max_vectors(), 4);
    msi_control(&mut c, 1 | 5 << 4);
    assert_eq!(c.enabled_vectors(), 4);
    assert_eq!(c.message_control() >> 4 & 7, 2);
    msi_control(&mut c, 1 | 7 << 4 | 0xfe0e); // also tries to write MMC and RO bits
    assert_eq!(c.message_control(), 1 | 2 << 1 | 2 << 4);
    assert_eq!(MsiCapability::new(0, false, false).max_vectors(), 1);
    assert_eq!(MsiCapability::new(255, false, false).max_vectors(), 32);
    msi_control(&mut c, 2 << 4);
    assert_eq!(c.enabled_vectors(), 0, "disabled");
}

#[test]
fn msi_vector_i_sets_low_data_bits() {
    let mut c = MsiCapability::new(8, true, false);
    cfg_write(&mut c, spec::MSI_ADDRESS_LO, &0xFEE0_1003u32.to_le_bytes());
    cfg_write(&mut c, spec::MSI_ADDRESS_HI, &1u32.to_le_bytes());
    cfg_write(&mut c, spec::MSI_DATA_64, &0xC0_47u32.to_le_bytes());
    msi_control(&mut c, 2 << 4); // 4 vectors, not yet enabled
    assert_eq!(c.message(0), Some(MsiMessage::new(0x1_FEE0_1000, 0xC044)));
    assert_eq!(c.message(3).unwrap().data, 0xC047);
    assert_eq!(c.message(4), None);
    assert_eq!(
        cfg_read32(&c, spec::MSI_DATA_64),
        0xC047,
        "raw data reads back"
    );

    let fx = msi_control(&mut c, 1 | 2 << 4);
    assert_eq!(fx.unmasked, [0, 1, 2, 3]);
    // Rewriting data while enabled updates every vector's route.
    let fx = cfg_write(&mut c, spec::MSI_DATA_64, &0x50u16.to_le_bytes());
    assert_eq!(fx.message_changed, [0, 1, 2, 3]);
    // Growing MME while enabled: new vectors unmasked, vectors whose low bits moved changed.
    let fx = msi_control(&mut c, 1 | 3 << 4);
    assert_eq!(fx.unmasked, [4, 5, 6, 7]);
    assert!(fx.masked.is_empty());
    assert_eq!(c.message(5).unwrap().data, 0x55);
    let fx = msi_control(&mut c, 0);
    assert!(fx.disabled && fx.masked.is_empty() && fx.unmasked.is_empty());
}

#[test]
fn msi_32bit_capability_ignores_the_upper_address() {
    let mut c = MsiCapability::new(1, false, false);
    cfg_write(&mut c, spec::MSI_ADDRESS_LO, &0xFEE0_0000u32.to_le_bytes());
    cfg_write(&mut c, spec::MSI_DATA_32, &0xdead_0031u32.to_le_bytes());
    assert_eq!(
        cfg_read32(&c, spec::MSI_DATA_32),
        0x31,
        "extended data reads 0"
    );
    assert_eq!(c.message(0), Some(MsiMessage::new(0xFEE0_0000, 0x31)));
    assert!(!c.is_pending(0));
    c.set_pending(0, true);
    assert!(
        !c.is_pending(0),
        "no pending register without per-vector masking"
    );
}

#[test]
fn msi_per_vector_mask_and_pending() {
    let mut c = MsiCapability::new(4, false, true);
    cfg_write(&mut c, spec::MSI_ADDRESS_LO, &0xFEE0_0000u32.to_le_bytes());
    cfg_write(&mut c, spec::MSI_MASK_32, &0b0010u32.to_le_bytes());
    assert_eq!(msi_control(&mut c, 1 | 2 << 4).unmasked, [0, 2, 3]);
    assert!(c.is_masked(1) && !c.is_masked(0) && c.is_masked(4));

    let fx = cfg_write(&mut c, spec::MSI_MASK_32, &0b1100u32.to_le_bytes());
    assert_eq!(fx.unmasked, [1]);
    assert_eq!(fx.masked, [2, 3]);
    // Only bits of existing vectors are writable.
    cfg_write(&mut c, spec::MSI_MASK_32, &u32::MAX.to_le_bytes());
    assert_eq!(cfg_read32(&c, spec::MSI_MASK_32), 0xf);

    c.set_pending(2, true);
    c.set_pending(4, true); // past 2^MMC: ignored
    assert!(c.is_pending(2) && !c.is_pending(4));
    assert_eq!(cfg_read32(&c, spec::MSI_PENDING_32), 0b0100);
    cfg_write(&mut c, spec::MSI_PENDING_32, &0u32.to_le_bytes());
    assert_eq!(
        cfg_read32(&c, spec::MSI_PENDING_32),
        0b0100,
        "pending is read-only"
    );
    // A masked vector's message changes silently.
    let fx = cfg_write(&mut c, spec::MSI_DATA_32, &0x60u16.to_le_bytes());
    assert!(fx.message_changed.is_empty());
    c.set_pending(2, false);
    assert!(!c.is_pending(2));
}

#[test]
fn msi_reset_clears_registers_and_reports_disabled() {
    let mut c = MsiCapability::new(2, true, true);
    cfg_write(&mut c, spec::MSI_ADDRESS_LO, &0xFEE0_0000u32.to_le_bytes());
    cfg_write(&mut c, spec::MSI_MASK_64, &1u32.to_le_bytes());
    msi_control(&mut c, 1 | 1 << 4);
    c.set_pending(0, true);
    let mut fx = VectorEffects::default();
    c.reset(&mut fx);
    assert!(fx.disabled && fx.reset);
    assert_eq!(c.message_control(), 1 << 1 | 1 << 7 | 1 << 8);
    assert_eq!(cfg_read32(&c, spec::MSI_ADDRESS_LO), 0);
    assert_eq!(cfg_read32(&c, spec::MSI_MASK_64), 0);
    assert!(!c.is_pending(0));
}

// Written to kill mutants cargo-mutants found surviving (docs/mutants.md).

#[test]
fn msi_enable_follows_writes_of_any_width() {
    let mut c = MsiCapability::new(4, false, false);
    // One byte: the control word's low byte holds the enable bit.
    cfg_write(&mut c, spec::MSI_MESSAGE_CONTROL, &[1]);
    assert!(c.is_enabled(), "a 1-byte enable");
    cfg_write(&mut c, spec::MSI_MESSAGE_CONTROL, &[0]);
    assert!(!c.is_enabled(), "a 1-byte disable");
    // The whole first dword (ID and next are read-only).
    cfg_write(&mut c, 0, &(1u32 << 16).to_le_bytes());
    assert!(c.is_enabled(), "a dword enable");
    cfg_write(&mut c, 0, &0u32.to_le_bytes());
    assert!(!c.is_enabled(), "a dword disable");
}

#[test]
fn vector_effects_are_empty_only_when_nothing_changed() {
    assert!(VectorEffects::default().is_empty());
    let mut each: [VectorEffects; 5] = Default::default();
    each[0].unmasked.push(1);
    each[1].masked.push(1);
    each[2].message_changed.push(1);
    each[3].disabled = true;
    each[4].reset = true;
    for (i, fx) in each.iter().enumerate() {
        assert!(!fx.is_empty(), "field {i} alone");
    }
}

#[test]
fn the_vector_past_the_last_is_never_pending() {
    for n in [1u16, 63, 64, 128, 2048] {
        let mut t = MsixTable::new(n);
        for v in 0..n {
            t.set_pending(v, true);
        }
        assert!(t.is_pending(n - 1));
        assert!(!t.is_pending(n), "{n} vectors");
    }
}
