//! PIRQs: a Linux HVM guest with `XENFEAT_hvm_pirqs` takes its devices' MSIs as event channels.
//! It asks for a free PIRQ (`PHYSDEVOP_get_free_pirq`), writes a message encoding it into the
//! device (vector 0, the PIRQ in the destination ID bits: Linux arch/x86/pci/xen.c
//! `xen_msi_compose_msg`), and binds a port to it (`EVTCHNOP_bind_pirq`). A device MSI with that
//! message then marks the port instead of raising a vector (QEMU xen_evtchn.c
//! `xen_evtchn_deliver_pirq_msi`).
//!
//! GSI PIRQs (`PHYSDEVOP_map_pirq` of type GSI, pins 0..24 as QEMU): the pin's inputs (its
//! line and its level irqfds' input) then mark the port instead of reaching the IOAPIC (QEMU
//! `xen_evtchn_set_gsi`): a rising level marks it once; `PHYSDEVOP_eoi` fires the pin's
//! resamplefds (their input dropped, as at an IOAPIC EOI) and marks the port again if the line
//! is still high. KVM drives a pin itself for kernel irqfds, so mapping a pin one reaches is
//! -EBUSY, and irqfds bound while it is mapped take vmirq's path (a resample irqfd on the
//! in-kernel irqchip, which only KVM serves, is refused).
//!
//! The PIRQ → port map is read lock-free on delivery and written under the table mutex; the
//! port's own binding word (state PIRQ, the PIRQ number) is checked under its read hold, so a
//! port closed or rebound meanwhile receives nothing.

use std::sync::atomic::Ordering;

use super::abi::stat;
use super::ports::Table;
use super::{EventChannels, PortState, XenError};
use crate::MsiMessage;

/// PIRQs a guest has (QEMU's default `nr_pirqs` of 256; the port binding keeps 8 bits).
pub const NR_PIRQS: u32 = 256;
/// First PIRQ given to GSIs; below it none is ever handed out (Xen's allocation, QEMU
/// `allocate_pirq`).
const FIRST_GSI_PIRQ: u32 = 16;
/// GSI PIRQs end at the IOAPIC's pins; MSIs count down from the top to here. Only these pins
/// can be mapped (QEMU's `IOAPIC_NUM_PINS`).
pub const IOAPIC_PINS: u32 = 24;
/// A GSI input: its line.
const LINE: u8 = 1;
/// A GSI input: its level irqfds (resampled).
const RESAMPLED: u8 = 2;

/// `MAP_PIRQ_TYPE_*` (physdev.h).
pub mod map_type {
    /// An MSI.
    pub const MSI: i32 = 0;
    /// A GSI.
    pub const GSI: i32 = 1;
    /// An MSI on a PCI segment.
    pub const MSI_SEG: i32 = 3;
    /// A multi-vector MSI.
    pub const MULTI_MSI: i32 = 4;
}

/// The PIRQ an MSI message encodes (QEMU `msi_pirq_target`): vector 0 (data bits 7:0), the
/// PIRQ's low 8 bits in address bits 19:12 and its high bits in address bits 63:40. `None` for
/// a message with a vector, or PIRQ 0.
pub fn msi_pirq(msg: MsiMessage) -> Option<u32> {
    if msg.data & 0xff != 0 {
        return None;
    }
    let pirq = ((msg.address & 0xff000) >> 12) as u32 | ((msg.address >> 32) as u32 & 0xffff_ff00);
    (pirq != 0).then_some(pirq)
}

/// The MSI message Linux writes for `pirq` (`xen_msi_compose_msg`).
pub fn pirq_msi(pirq: u32) -> MsiMessage {
    let address = 0xFEE0_0000 | u64::from(pirq & 0xff) << 12 | u64::from(pirq & !0xff) << 32;
    MsiMessage::new(address, 7 << 8)
}

impl EventChannels {
    /// Delivers an MSI encoding a PIRQ to the port bound to it; dropped (Ok) when no port is
    /// bound, as Xen drops an unbound PIRQ. Lock-free.
    pub fn deliver_pirq_msi(&self, msg: MsiMessage) -> Result<(), XenError> {
        let pirq = msi_pirq(msg).ok_or(XenError::Invalid)?;
        self.deliver_to_pirq(pirq)
    }

    /// Marks the port bound to `pirq`; nothing if none (Xen drops it).
    fn deliver_to_pirq(&self, pirq: u32) -> Result<(), XenError> {
        let port = self
            .pirq_ports
            .get(pirq as usize)
            .map_or(0, |p| p.load(Ordering::Acquire));
        if port == 0 {
            return Ok(());
        }
        let Some(guard) = self.slot(port)?.try_read() else {
            return Ok(());
        };
        let b = guard.binding;
        if b.stat != stat::PIRQ || u32::from(b.virq) != pirq {
            return Ok(());
        }
        let vcpu = u32::from(b.vcpu);
        let r = self.mark_pending(port, vcpu, &guard);
        drop(guard);
        self.raise_if(r, vcpu).map(drop)
    }

    /// Calls `hook(pirq)` after each successful `EVTCHNOP_bind_pirq`, with no lock held: the
    /// VMM unmasks the device vector it masked while the guest set it up (Xen
    /// `arch_evtchn_bind_pirq`, QEMU's unmask at bind).
    pub fn set_pirq_bind_hook(&self, hook: impl Fn(u32) + Send + Sync + 'static) {
        *self.pirq_hook.write().unwrap_or_else(|e| e.into_inner()) = Some(Box::new(hook));
    }

    /// The PIRQs handed out, lowest first.
    pub fn allocated_pirqs(&self) -> Vec<u32> {
        let t = self.lock();
        (0..NR_PIRQS).filter(|p| t.pirqs[*p as usize]).collect()
    }

    /// `PHYSDEVOP_get_free_pirq`: GSI types take the lowest free of 16..24, others (and GSIs
    /// when those are gone) the highest free from 255 down to 24 (QEMU `allocate_pirq`).
    pub(super) fn get_free_pirq(&self, t: &mut Table, kind: i32) -> Result<u32, XenError> {
        let gsi = (FIRST_GSI_PIRQ..IOAPIC_PINS).find(|p| !t.pirqs[*p as usize]);
        let pirq = gsi
            .filter(|_| kind == map_type::GSI)
            .or_else(|| {
                (IOAPIC_PINS..NR_PIRQS)
                    .rev()
                    .find(|p| !t.pirqs[*p as usize])
            })
            .ok_or(XenError::NoSpace)?;
        t.pirqs[pirq as usize] = true;
        Ok(pirq)
    }

    /// `PHYSDEVOP_unmap_pirq` of this domain's `pirq`: -EINVAL out of range, -ENOENT if never
    /// handed out. A port bound to it stays open and receives nothing more.
    pub(super) fn unmap_pirq(&self, t: &mut Table, pirq: i32) -> Result<(), XenError> {
        let p = u32::try_from(pirq)
            .ok()
            .filter(|p| *p < NR_PIRQS)
            .ok_or(XenError::Invalid)?;
        if !t.pirqs[p as usize] {
            return Err(XenError::NoEntry);
        }
        t.pirqs[p as usize] = false;
        self.pirq_ports[p as usize].store(0, Ordering::Release);
        Ok(())
    }

    /// `EVTCHNOP_bind_pirq` (Xen `evtchn_bind_pirq`): range -EINVAL, a PIRQ with a port already
    /// -EEXIST; the port notifies vCPU 0.
    pub(super) fn bind_pirq(&self, t: &mut Table, pirq: u32) -> Result<u32, XenError> {
        if pirq >= NR_PIRQS {
            return Err(XenError::Invalid);
        }
        if self.pirq_ports[pirq as usize].load(Ordering::Acquire) != 0 {
            return Err(XenError::Exists);
        }
        let port = self.alloc(t, PortState::Pirq(pirq), 0)?;
        self.pirq_ports[pirq as usize].store(port, Ordering::Release);
        Ok(port)
    }

    /// Runs the bind hook for `pirq` (no lock held).
    pub(super) fn pirq_bound(&self, pirq: u32) {
        if let Some(hook) = self
            .pirq_hook
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            hook(pirq);
        }
    }

    /// PHYSDEVOP calls name this domain only (QEMU: -EPERM otherwise).
    pub(super) fn check_self_only(&self, domid: u16) -> Result<(), XenError> {
        if self.is_self(domid) {
            Ok(())
        } else {
            Err(XenError::Permission)
        }
    }

    /// `PHYSDEVOP_irq_status_query`: GSI PIRQs need an EOI (`XENIRQSTAT_needs_eoi`), MSI
    /// PIRQs none.
    pub(super) fn irq_status(&self, pirq: u32) -> Result<u32, XenError> {
        if pirq >= NR_PIRQS {
            return Err(XenError::Invalid);
        }
        Ok(u32::from(self.lock().pirq_gsi[pirq as usize].is_some()))
    }

    /// `PHYSDEVOP_eoi`: -EINVAL out of range, -ENOENT unallocated, -EINVAL for an MSI PIRQ
    /// (QEMU `xen_physdev_eoi_pirq`: only GSIs take an EOI). For a GSI PIRQ, drops the
    /// resampled input and returns the GSI, whose resamplefds the caller fires before
    /// [`Self::reassert_gsi`].
    pub(super) fn eoi_pirq(&self, t: &Table, pirq: u32) -> Result<u32, XenError> {
        if pirq >= NR_PIRQS {
            return Err(XenError::Invalid);
        }
        if !t.pirqs[pirq as usize] {
            return Err(XenError::NoEntry);
        }
        let gsi = t.pirq_gsi[pirq as usize].ok_or(XenError::Invalid)?;
        self.gsi_levels[gsi as usize].fetch_and(!RESAMPLED, Ordering::SeqCst);
        Ok(gsi)
    }

    /// After an EOI: a GSI whose level is still high marks its port again (QEMU "reassert a
    /// level IRQ if needed").
    pub(super) fn reassert_gsi(&self, gsi: u32) {
        if self.gsi_levels[gsi as usize].load(Ordering::SeqCst) != 0 {
            self.deliver_gsi(gsi);
        }
    }

    /// `PHYSDEVOP_map_pirq` of type GSI (QEMU `xen_physdev_map_pirq`): `pirq` < 0 allocates
    /// one; a PIRQ already mapped to a GSI is -EBUSY; PIRQ 0, or a GSI outside the IOAPIC's 24
    /// pins, -EINVAL. The caller has diverted the pin. Returns the PIRQ.
    pub(super) fn map_gsi_pirq(&self, t: &mut Table, gsi: i32, pirq: i32) -> Result<u32, XenError> {
        let gsi = u32::try_from(gsi)
            .ok()
            .filter(|g| *g < IOAPIC_PINS)
            .ok_or(XenError::Invalid)?;
        let pirq = if pirq < 0 {
            self.get_free_pirq(t, map_type::GSI)?
        } else {
            let p = pirq as u32;
            // PIRQ 0 is never handed out (Xen's and QEMU's allocators start at 16), and 0
            // means "no PIRQ" in the pin map, as in QEMU's `gsi_pirq`.
            if p == 0 || p >= NR_PIRQS {
                return Err(XenError::Invalid);
            }
            if t.pirq_gsi[p as usize].is_some() {
                return Err(XenError::Busy);
            }
            t.pirqs[p as usize] = true;
            p
        };
        // A GSI mapped again moves to the new PIRQ.
        if let Some(old) = t.pirq_gsi.iter().position(|g| *g == Some(gsi)) {
            t.pirq_gsi[old] = None;
        }
        t.pirq_gsi[pirq as usize] = Some(gsi);
        self.gsi_pirqs[gsi as usize].store(pirq, Ordering::SeqCst);
        Ok(pirq)
    }

    /// Whether IOAPIC pin `gsi` is mapped to a PIRQ.
    pub fn gsi_mapped(&self, gsi: u32) -> bool {
        self.gsi_pirqs
            .get(gsi as usize)
            .is_some_and(|p| p.load(Ordering::SeqCst) != 0)
    }

    /// Unmaps a GSI PIRQ's GSI; returns its inputs' levels (line, resampled), for the IOAPIC.
    pub(super) fn unmap_gsi(&self, t: &mut Table, pirq: u32) -> Option<(u32, bool, bool)> {
        let gsi = t.pirq_gsi.get_mut(pirq as usize)?.take()?;
        self.gsi_pirqs[gsi as usize].store(0, Ordering::SeqCst);
        let levels = self.gsi_levels[gsi as usize].swap(0, Ordering::SeqCst);
        Some((gsi, levels & LINE != 0, levels & RESAMPLED != 0))
    }

    /// QEMU `xen_evtchn_set_gsi`: an input of pin `gsi` changed; true if the pin is a PIRQ's
    /// (then a rising level marks its port). Lock-free.
    pub fn set_gsi_level(&self, gsi: u32, resampled: bool, level: bool) -> bool {
        let Some(slot) = self.gsi_pirqs.get(gsi as usize) else {
            return false;
        };
        if slot.load(Ordering::SeqCst) == 0 {
            return false;
        }
        let bit = if resampled { RESAMPLED } else { LINE };
        let levels = &self.gsi_levels[gsi as usize];
        if level {
            if levels.fetch_or(bit, Ordering::SeqCst) == 0 {
                self.deliver_gsi(gsi);
            }
        } else {
            levels.fetch_and(!bit, Ordering::SeqCst);
        }
        true
    }

    /// Marks the port bound to `gsi`'s PIRQ, if any.
    fn deliver_gsi(&self, gsi: u32) {
        let pirq = self.gsi_pirqs[gsi as usize].load(Ordering::SeqCst);
        if pirq != 0 {
            let _ = self.deliver_to_pirq(pirq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pirq_encoding_is_linuxs() {
        for pirq in [1, 24, 255, 0x1234] {
            assert_eq!(msi_pirq(pirq_msi(pirq)), Some(pirq));
        }
        assert_eq!(pirq_msi(0x1234).address, 0x1200_0000_0000 | 0xFEE3_4000);
        assert_eq!(
            msi_pirq(MsiMessage::new(0xFEE0_1000, 0x41)),
            None,
            "a vector"
        );
        assert_eq!(msi_pirq(MsiMessage::new(0xFEE0_0000, 0)), None, "PIRQ 0");
    }
}
