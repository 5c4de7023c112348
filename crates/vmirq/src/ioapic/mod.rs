//! A userspace 82093AA IOAPIC (version 0x11) as a pure state machine.
//!
//! The module owns the redirection table, the IOAPIC ID, IOREGSEL, each pin's input level and
//! the per-pin EOI storm counters. It does no I/O, takes no locks and starts no timers: every
//! operation appends what the caller must do to an [`Effects`], and the caller (which holds the
//! [`Ioapic`] in a `Mutex`) acts on it after the operation.
//!
//! Semantics follow Linux `arch/x86/kvm/ioapic.c`; where KVM and the datasheet disagree the
//! choice is documented at the rule. One function, `evaluate`, decides whether a pin delivers;
//! assertion, EOI, reprogramming and deferred re-delivery all go through it.

pub mod spec;
mod state;

pub use state::{IoapicState, PinState};

#[cfg(test)]
mod tests;

use crate::msi::MsiMessage;
use spec::RedirectionEntry;

/// Where the IOAPIC sits in guest physical memory.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Size of the MMIO region decoded: IOREGSEL at 0x00 and IOWIN at 0x10, aliased every 256 bytes
/// (Linux and QEMU mask the offset with 0xff). There is no EOI register (version 0x11).
pub const IOAPIC_MMIO_SIZE: u64 = 0x1000;
/// Back-to-back EOI re-deliveries of one pin after which the next one is deferred
/// (Linux `IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT`).
pub const REDELIVERY_STORM_LIMIT: u32 = 10_000;
/// Most pins an [`Ioapic`] has: an 8-bit IOREGSEL reaches 120 redirection entries.
pub const MAX_PINS: u32 = spec::MAX_PINS;

/// What the caller must do after an operation, in the order of the fields.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// Pins whose redirection entry changed its MSI ([`Ioapic::pin_msi`]) or its mask: the
    /// caller republishes the kernel route. Apply these before `deliver`: on a split irqchip KVM
    /// only exits on the EOI of a level vector its routes name, so a level MSI injected before
    /// its route is committed could leave Remote IRR set forever.
    pub routes_changed: Vec<u32>,
    /// MSIs to inject now, one per pin delivery, built from the pin's redirection entry (see
    /// [`Ioapic::pin_msi`]).
    pub deliver: Vec<(u32, MsiMessage)>,
    /// Pins whose resampler must be notified: the guest acknowledged the pin (EOI), or an
    /// unmask found a resampled level that may be stale. The model has already de-asserted the
    /// pin's resampled source ([`Ioapic::set_resampled_line`]); a device that still needs
    /// service asserts it again.
    pub resample: Vec<u32>,
    /// Pins whose re-delivery hit [`REDELIVERY_STORM_LIMIT`]: call
    /// [`Ioapic::redeliver_deferred`] for each about 10 ms later (Linux uses HZ / 100).
    pub deferred: Vec<u32>,
}

impl Effects {
    /// Empties every list, keeping the allocations for the next operation.
    pub fn clear(&mut self) {
        let Self {
            routes_changed,
            deliver,
            resample,
            deferred,
        } = self;
        routes_changed.clear();
        deliver.clear();
        resample.clear();
        deferred.clear();
    }

    /// True when the operation left the caller nothing to do.
    pub fn is_empty(&self) -> bool {
        let Self {
            routes_changed,
            deliver,
            resample,
            deferred,
        } = self;
        routes_changed.is_empty()
            && deliver.is_empty()
            && resample.is_empty()
            && deferred.is_empty()
    }
}

/// One input pin and its redirection entry.
#[derive(Clone, Debug)]
struct Pin {
    entry: RedirectionEntry,
    /// Level from [`Ioapic::set_line`]: the OR of the sources that know their true level.
    line: bool,
    /// The resampled source (level irqfds with a resamplefd): asserted by a signal, de-asserted
    /// only when the guest acknowledges the pin (Linux virt/kvm/eventfd.c, "on ack, de-assert
    /// and notify"). All of a pin's resampled sources share it, as they share one source ID in KVM.
    resampled: bool,
    /// Back-to-back re-deliveries caused by EOI (Linux `irq_eoi[pin]`).
    redeliveries: u32,
}

impl Pin {
    const RESET: Self = Self {
        entry: RedirectionEntry::RESET,
        line: false,
        resampled: false,
        redeliveries: 0,
    };

    /// The level the IOAPIC sees at the pin (Linux `ioapic->irr` bit).
    fn asserted(&self) -> bool {
        self.line || self.resampled
    }
}

/// A userspace IOAPIC.
///
/// Levels are logical: `true` means "the device asserts its interrupt", whatever the pin's
/// polarity bit says. Like KVM (`ioapic_set_irq` never reads `polarity`), the polarity bit is
/// stored and read back but does not invert anything; the caller's sources are already logical.
///
/// A pin's level is the OR of two inputs:
/// - [`Ioapic::set_line`]: sources whose current level the caller knows (emulated devices),
///   already OR-ed by the caller;
/// - [`Ioapic::set_resampled_line`]: level irqfds with a resamplefd, whose level the caller
///   cannot observe. That input is de-asserted by the guest's acknowledgement, which the model
///   reports in [`Effects::resample`]; feeding such sources through `set_line` instead would
///   re-deliver on every EOI before the caller could de-assert them.
///
/// Not thread-safe by design: the caller serializes all operations (one `Mutex`), so an
/// assertion racing an EOI is ordered before or after it, and `eoi` reads the line level after
/// clearing Remote IRR: a re-assertion is never lost.
#[derive(Clone, Debug)]
pub struct Ioapic {
    pins: Box<[Pin]>,
    /// Bits 27:24 of the ID register.
    id: u8,
    ioregsel: u8,
}

impl Ioapic {
    /// An IOAPIC with `pins` pins, clamped to `1..=MAX_PINS` (120: the most an 8-bit IOREGSEL
    /// can reach). All entries start masked, the ID is 0.
    pub fn new(pins: u32) -> Self {
        let pins = pins.clamp(1, MAX_PINS) as usize;
        Self {
            pins: vec![Pin::RESET; pins].into_boxed_slice(),
            id: 0,
            ioregsel: 0,
        }
    }

    /// Number of pins (redirection entries).
    pub fn pins(&self) -> u32 {
        self.pins.len() as u32
    }

    /// Resets the registers (Linux `kvm_ioapic_reset`): every entry masked with all other bits
    /// 0, ID 0, IOREGSEL 0, storm counters 0. Pin input levels are inputs, not IOAPIC state, and
    /// are kept. Every pin's route may have changed: the caller republishes them all.
    pub fn reset(&mut self) {
        let Self { pins, id, ioregsel } = self;
        for pin in pins.iter_mut() {
            let Pin {
                entry,
                line: _,
                resampled: _,
                redeliveries,
            } = pin;
            *entry = RedirectionEntry::RESET;
            *redeliveries = 0;
        }
        *id = 0;
        *ioregsel = 0;
    }

    /// A guest MMIO read at `offset` into the region. Never panics. Accesses of 1, 2, 4 or 8
    /// bytes at IOREGSEL or IOWIN return the low bytes of the register zero-extended to 64 bits
    /// (Linux `ioapic_mmio_read`); other offsets inside the region read 0, as in Linux and
    /// QEMU. Offsets outside the region and other sizes read all-ones.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match (offset, data.len()) {
            (IOAPIC_MMIO_SIZE.., _) => None,
            (_, 1 | 2 | 4 | 8) => Some(match offset & 0xff {
                spec::IOREGSEL => u32::from(self.ioregsel),
                spec::IOWIN => self.read_register(),
                _ => 0,
            }),
            _ => None,
        };
        match value {
            Some(v) => data.copy_from_slice(&u64::from(v).to_le_bytes()[..data.len()]),
            None => data.fill(0xff),
        }
    }

    /// A guest MMIO write at `offset` into the region. Never panics. IOREGSEL takes the low
    /// byte of a 1-, 2-, 4- or 8-byte write (Linux). IOWIN takes 4-byte writes, and the low
    /// dword of 8-byte ones (Linux); narrower IOWIN writes are ignored, as QEMU does, rather
    /// than zero-extended as Linux does (a byte write would silently unmask the pin). Anything
    /// else is ignored.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8], fx: &mut Effects) {
        if offset >= IOAPIC_MMIO_SIZE {
            return;
        }
        let mut bytes = [0u8; 4];
        match data.len() {
            1 | 2 | 4 => bytes[..data.len()].copy_from_slice(data),
            8 => bytes.copy_from_slice(&data[..4]),
            _ => return,
        }
        let value = u32::from_le_bytes(bytes);
        match offset & 0xff {
            spec::IOREGSEL => self.ioregsel = value as u8,
            spec::IOWIN if data.len() >= 4 => self.write_register(value, fx),
            _ => {}
        }
    }

    /// Sets the level of `pin`'s plain sources (`true` = asserted). An edge pin delivers on a
    /// rising edge while unmasked; a level pin delivers whenever it is asserted, unmasked and
    /// Remote IRR is clear. Out-of-range pins are ignored.
    pub fn set_line(&mut self, pin: u32, level: bool, fx: &mut Effects) {
        self.set_input(pin, fx, |p| p.line = level);
    }

    /// Asserts (`true`) or de-asserts (`false`) `pin`'s resampled source: the level irqfds with
    /// a resamplefd routed to the pin. Once asserted it stays asserted until the guest
    /// acknowledges the pin; the model then de-asserts it and reports the pin in
    /// [`Effects::resample`]. Pass `false` only when the last such irqfd goes away (Linux
    /// `irqfd_resampler_shutdown`). Out-of-range pins are ignored.
    pub fn set_resampled_line(&mut self, pin: u32, level: bool, fx: &mut Effects) {
        self.set_input(pin, fx, |p| p.resampled = level);
    }

    /// The guest EOI'd `vector` (a LAPIC's EOI broadcast; on a split irqchip,
    /// `KVM_EXIT_IOAPIC_EOI`). Every level pin programmed with `vector` (pending or not), and
    /// every pin of it whose resampled source is asserted, is acknowledged: Remote IRR
    /// cleared, resampled source de-asserted, pin reported in [`Effects::resample`]. A pending
    /// level pin still asserted and unmasked is then delivered again, unless that would be the
    /// [`REDELIVERY_STORM_LIMIT`]th back-to-back re-delivery, which is deferred instead.
    pub fn eoi(&mut self, vector: u8, fx: &mut Effects) {
        for index in 0..self.pins.len() {
            let pin = &mut self.pins[index];
            if pin.entry.vector() != vector {
                continue;
            }
            let level = pin.entry.is_level();
            let was_pending = level && pin.entry.remote_irr();
            // Linux kvm_ioapic_update_eoi_one runs the ack notifiers (the irqfd resampler:
            // de-assert, then notify) for every pin of the vector, pending or not, before
            // clearing Remote IRR; QEMU's ioapic_eoi_broadcast notifies every level pin's
            // resamplefds likewise. (A level taken through another path, such as a LAPIC
            // restored by a migration, is acknowledged too.)
            let acked_resampled = std::mem::take(&mut pin.resampled);
            if !level && !acked_resampled {
                continue;
            }
            pin.entry = pin.entry.with_remote_irr(false);
            fx.resample.push(index as u32);
            if !was_pending {
                continue;
            }
            // Linux kvm_ioapic_update_eoi_one: count re-deliveries while the line stays high,
            // and after IOAPIC_SUCCESSIVE_IRQ_MAX_COUNT let a storming guest make progress.
            if !pin.entry.masked() && pin.asserted() {
                pin.redeliveries += 1;
                if pin.redeliveries >= REDELIVERY_STORM_LIMIT {
                    pin.redeliveries = 0;
                    fx.deferred.push(index as u32);
                    continue;
                }
                self.evaluate(index, false, fx);
            } else {
                pin.redeliveries = 0;
            }
        }
    }

    /// Delivers `pin` if it should be (a level pin asserted, unmasked, Remote IRR clear); for a
    /// pin deferred by the storm guard (Linux `kvm_ioapic_eoi_inject_work`). Calling it at any
    /// other time is harmless. Out-of-range pins are ignored.
    pub fn redeliver_deferred(&mut self, pin: u32, fx: &mut Effects) {
        if let Some(index) = self.index(pin) {
            self.evaluate(index, false, fx);
        }
    }

    /// The MSI `pin`'s entry produces, whether or not it is masked; `None` if out of range.
    /// An x86 message to the entry's destination ID (bits 63:56, plus 55:49 as extended ID),
    /// destination mode, delivery mode and vector; level pins set trigger and assert bits, which
    /// is how a split irqchip's KVM learns which vectors need an EOI exit.
    pub fn pin_msi(&self, pin: u32) -> Option<MsiMessage> {
        self.entry(pin).map(RedirectionEntry::msi)
    }

    /// `pin`'s redirection entry as the guest reads it; `None` if out of range.
    pub fn entry(&self, pin: u32) -> Option<RedirectionEntry> {
        self.index(pin).map(|i| self.pins[i].entry)
    }

    /// Whether `pin` is asserted (by either input); false if out of range.
    pub fn line(&self, pin: u32) -> bool {
        self.index(pin).is_some_and(|i| self.pins[i].asserted())
    }

    /// Whether `pin`'s resampled source is asserted; false if out of range.
    pub fn resampled_line(&self, pin: u32) -> bool {
        self.index(pin).is_some_and(|i| self.pins[i].resampled)
    }

    /// Whether `pin` has a level interrupt waiting for EOI; false if out of range.
    pub fn remote_irr(&self, pin: u32) -> bool {
        self.index(pin)
            .is_some_and(|i| self.pins[i].entry.remote_irr())
    }

    fn index(&self, pin: u32) -> Option<usize> {
        let index = usize::try_from(pin).ok()?;
        (index < self.pins.len()).then_some(index)
    }

    fn set_input(&mut self, pin: u32, fx: &mut Effects, set: impl FnOnce(&mut Pin)) {
        let Some(index) = self.index(pin) else {
            return;
        };
        let pin = &mut self.pins[index];
        let was = pin.asserted();
        set(pin);
        // Linux ioapic_set_irq: a de-assertion only lowers the level; Remote IRR waits for EOI.
        if pin.asserted() {
            self.evaluate(index, !was, fx);
        }
    }

    /// The one place that decides whether `pin` delivers now (Linux `ioapic_service`, OpenVMM
    /// `IrqEntry::evaluate`). `rising_edge` says whether this call saw the level go 0 -> 1.
    fn evaluate(&mut self, index: usize, rising_edge: bool, fx: &mut Effects) {
        let pin = &mut self.pins[index];
        let entry = pin.entry;
        // 82093AA §3.2.4: edges on a masked pin are ignored, not held pending (Linux and QEMU
        // agree); a masked level pin is evaluated again when unmasked.
        if entry.masked() {
            return;
        }
        if entry.is_level() {
            if !pin.asserted() || entry.remote_irr() {
                return;
            }
            pin.entry = entry.with_remote_irr(true);
        } else if !rising_edge {
            return;
        }
        fx.deliver.push((index as u32, entry.msi()));
    }

    fn read_register(&self) -> u32 {
        match self.ioregsel {
            // Linux ioapic_read_indirect: the arbitration ID reads as the ID.
            spec::REG_ID | spec::REG_ARBITRATION => u32::from(self.id) << spec::ID_SHIFT,
            spec::REG_VERSION => spec::VERSION | (self.pins() - 1) << spec::VERSION_MAX_ENTRY_SHIFT,
            reg => match self.redirection_register(reg) {
                Some((index, false)) => self.pins[index].entry.low(),
                Some((index, true)) => self.pins[index].entry.high(),
                // Linux reads all-ones for indices that name no register.
                None => !0,
            },
        }
    }

    fn write_register(&mut self, value: u32, fx: &mut Effects) {
        match self.ioregsel {
            spec::REG_ID => self.id = ((value >> spec::ID_SHIFT) & spec::ID_MASK) as u8,
            // Version and arbitration are read-only; unknown indices are ignored.
            reg => {
                if let Some((index, high)) = self.redirection_register(reg) {
                    self.write_redirection(index, high, value, fx);
                }
            }
        }
    }

    /// The pin and half (`true` = high dword) register index `reg` names, if any.
    fn redirection_register(&self, reg: u8) -> Option<(usize, bool)> {
        let offset = reg.checked_sub(spec::REG_REDIRECTION_BASE)?;
        let index = usize::from(offset / 2);
        (index < self.pins.len()).then_some((index, offset & 1 == 1))
    }

    fn write_redirection(&mut self, index: usize, high: bool, value: u32, fx: &mut Effects) {
        let pin = &mut self.pins[index];
        let old = pin.entry;
        let mut new = old.guest_write(high, value);
        // Linux ioapic_write_indirect: an edge entry has no Remote IRR; guests (Linux, Xen)
        // switch a pin to edge and back to clear it on IOAPICs without an EOI register.
        if !new.is_level() {
            new = new.with_remote_irr(false);
        }
        pin.entry = new;
        if old.msi() != new.msi() || old.masked() != new.masked() {
            fx.routes_changed.push(index as u32);
        }
        // Linux ioapic_write_indirect: an unmasked level pin whose level is only known through
        // the resampler may be stale (the device was serviced while masked, e.g. IRQF_ONESHOT),
        // so acknowledge it to the resampler instead of injecting a spurious interrupt. Linux
        // clears the whole irr bit there; plain sources' levels are current, so they stay.
        if new.is_level() && !new.masked() && !new.remote_irr() && pin.resampled {
            pin.resampled = false;
            fx.resample.push(index as u32);
        }
        // Unmasking or reprogramming a level pin delivers if it is asserted.
        self.evaluate(index, false, fx);
    }
}
