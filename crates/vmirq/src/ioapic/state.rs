//! The IOAPIC's state for a snapshot: every register and input, destructured so a new field
//! cannot be forgotten.

use serde::{Deserialize, Serialize};

use super::spec::RedirectionEntry;
use super::{Ioapic, Pin, MAX_PINS, REDELIVERY_STORM_LIMIT};
use crate::snapshot::SnapshotError;

/// A userspace IOAPIC's registers and pin inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IoapicState {
    /// Bits 27:24 of the ID register.
    pub id: u8,
    /// The register IOREGSEL selects.
    pub ioregsel: u8,
    /// One per pin, pin 0 first.
    pub pins: Vec<PinState>,
}

/// One pin: its redirection entry (Remote IRR included) and its inputs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinState {
    /// The raw 64-bit redirection entry.
    pub entry: u64,
    /// The plain sources' level.
    pub line: bool,
    /// The resampled source's level.
    pub resampled: bool,
    /// Back-to-back re-deliveries counted by the storm guard.
    pub redeliveries: u32,
}

impl Ioapic {
    /// Everything the IOAPIC holds.
    pub fn save(&self) -> IoapicState {
        let Self { pins, id, ioregsel } = self;
        IoapicState {
            id: *id,
            ioregsel: *ioregsel,
            pins: pins
                .iter()
                .map(|pin| {
                    let Pin {
                        entry,
                        line,
                        resampled,
                        redeliveries,
                    } = pin;
                    PinState {
                        entry: entry.bits(),
                        line: *line,
                        resampled: *resampled,
                        redeliveries: *redeliveries,
                    }
                })
                .collect(),
        }
    }

    /// Takes `state` as it is, delivering nothing (a pin that should deliver does so at its
    /// next evaluation: [`Ioapic::redeliver_deferred`] on every pin after restore). Refuses,
    /// leaving `self` untouched, a state with another pin count or with values no IOAPIC can
    /// hold: reserved entry bits, Remote IRR on an edge entry, an ID beyond 4 bits, a storm
    /// count at or past the limit.
    pub fn restore(&mut self, state: &IoapicState) -> Result<(), SnapshotError> {
        check(state, self.pins())?;
        let IoapicState { id, ioregsel, pins } = state;
        self.id = *id;
        self.ioregsel = *ioregsel;
        for (pin, saved) in self.pins.iter_mut().zip(pins) {
            let PinState {
                entry,
                line,
                resampled,
                redeliveries,
            } = saved;
            *pin = Pin {
                entry: RedirectionEntry::from_bits(*entry),
                line: *line,
                resampled: *resampled,
                redeliveries: *redeliveries,
            };
        }
        Ok(())
    }
}

/// Bits a redirection entry can hold: what a guest writes, plus Remote IRR. (Delivery status
/// is always 0 here: messages go out at once.)
const HOLDABLE: u64 = RedirectionEntry::GUEST_WRITABLE | 1 << 14;

fn check(state: &IoapicState, pins: u32) -> Result<(), SnapshotError> {
    let bad = |what: String| Err(SnapshotError::Invalid(format!("IOAPIC: {what}")));
    if state.pins.len() != pins as usize || pins > MAX_PINS {
        return bad(format!(
            "{} pins saved, this VM's IOAPIC has {pins}",
            state.pins.len()
        ));
    }
    if u32::from(state.id) > super::spec::ID_MASK {
        return bad(format!("ID {} does not fit in 4 bits", state.id));
    }
    for (n, pin) in state.pins.iter().enumerate() {
        let entry = RedirectionEntry::from_bits(pin.entry);
        if pin.entry & !HOLDABLE != 0 {
            return bad(format!(
                "pin {n}: entry {:#x} sets reserved bits",
                pin.entry
            ));
        }
        if entry.remote_irr() && !entry.is_level() {
            return bad(format!("pin {n}: Remote IRR on an edge-triggered entry"));
        }
        if pin.redeliveries >= REDELIVERY_STORM_LIMIT {
            return bad(format!(
                "pin {n}: storm count {} past the limit",
                pin.redeliveries
            ));
        }
    }
    Ok(())
}
