//! PIRQs: a Linux HVM guest with `XENFEAT_hvm_pirqs` takes its devices' MSIs as event channels.
//! It asks for a free PIRQ (`PHYSDEVOP_get_free_pirq`), writes a message encoding it into the
//! device (vector 0, the PIRQ in the destination ID bits: Linux arch/x86/pci/xen.c
//! `xen_msi_compose_msg`), and binds a port to it (`EVTCHNOP_bind_pirq`). A device MSI with that
//! message then marks the port instead of raising a vector (QEMU xen_evtchn.c
//! `xen_evtchn_deliver_pirq_msi`).
//!
//! MSI PIRQs only: a GSI PIRQ (`PHYSDEVOP_map_pirq` of type GSI) would divert an IOAPIC pin's
//! deliveries, which KVM makes itself for kernel irqfds; it answers -ENOSYS and the guest keeps
//! its INTx lines on the IOAPIC.
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
/// GSI PIRQs end at the IOAPIC's pins; MSIs count down from the top to here.
const IOAPIC_PINS: u32 = 24;

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
        let r = self.mark_pending(port, vcpu);
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

    /// `PHYSDEVOP_irq_status_query`: MSI PIRQs need no EOI (flags 0).
    pub(super) fn irq_status(&self, pirq: u32) -> Result<u32, XenError> {
        if pirq >= NR_PIRQS {
            return Err(XenError::Invalid);
        }
        Ok(0)
    }

    /// `PHYSDEVOP_eoi`: -EINVAL out of range, -ENOENT unallocated, and -EINVAL for the MSI
    /// PIRQs this emulation has (QEMU `xen_physdev_eoi_pirq`: only GSIs take an EOI).
    pub(super) fn eoi_pirq(&self, t: &Table, pirq: u32) -> Result<(), XenError> {
        if pirq >= NR_PIRQS {
            return Err(XenError::Invalid);
        }
        if !t.pirqs[pirq as usize] {
            return Err(XenError::NoEntry);
        }
        Err(XenError::Invalid)
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
