//! [`Hypercalls`]: the Xen hypercalls a Linux HVM guest makes for its event channels, by
//! hypercall number, as a VMM's vCPU loop receives them (the number in EAX/RAX, the arguments
//! in EBX, ECX, EDX / RDI, RSI, RDX). Each answer is Xen's; the function it follows is named
//! where it is implemented.
//!
//! | number | operations |
//! |---|---|
//! | `memory_op` (12) | `XENMEM_add_to_physmap` of `XENMAPSPACE_shared_info` |
//! | `vcpu_op` (24) | `register_vcpu_info`, single-shot and periodic timers |
//! | `sched_op` (29) | `SCHEDOP_poll`; `SCHEDOP_yield` answers 0 |
//! | `event_channel_op` (32) | every `EVTCHNOP` ([`EventChannels::hypercall`]) |
//! | `physdev_op` (33) | `get_free_pirq`, `map_pirq`, `unmap_pirq`, `irq_status_query`, `eoi` (MSI PIRQs) |
//! | `hvm_op` (34) | `HVMOP_set_param` / `get_param` of `HVM_PARAM_CALLBACK_IRQ`, `HVMOP_set_evtchn_upcall_vector` |
//!
//! Anything else is -ENOSYS: the VMM answers the rest of the guest's hypercalls itself.
//! `SCHEDOP_poll` blocks the calling thread, which must be the vCPU's own.

use std::sync::Arc;

use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::{Callback, EventChannels, UpcallError, Upcalls, XenError};

/// Xen hypercall numbers (xen.h `__HYPERVISOR_*`).
pub mod nr {
    /// `__HYPERVISOR_memory_op`.
    pub const MEMORY_OP: u32 = 12;
    /// `__HYPERVISOR_vcpu_op`.
    pub const VCPU_OP: u32 = 24;
    /// `__HYPERVISOR_sched_op`.
    pub const SCHED_OP: u32 = 29;
    /// `__HYPERVISOR_event_channel_op`.
    pub const EVENT_CHANNEL_OP: u32 = 32;
    /// `__HYPERVISOR_physdev_op`.
    pub const PHYSDEV_OP: u32 = 33;
    /// `__HYPERVISOR_hvm_op`.
    pub const HVM_OP: u32 = 34;
}

/// `VCPUOP_*` (vcpu.h).
pub mod vcpuop {
    /// Arms the periodic timer.
    pub const SET_PERIODIC_TIMER: u32 = 6;
    /// Stops the periodic timer.
    pub const STOP_PERIODIC_TIMER: u32 = 7;
    /// Arms the calling vCPU's single-shot timer.
    pub const SET_SINGLESHOT_TIMER: u32 = 8;
    /// Stops the calling vCPU's single-shot timer.
    pub const STOP_SINGLESHOT_TIMER: u32 = 9;
    /// Places a vCPU's `vcpu_info`.
    pub const REGISTER_VCPU_INFO: u32 = 10;
}

/// `SCHEDOP_*` (sched.h).
pub mod schedop {
    /// Gives up the CPU.
    pub const YIELD: u32 = 0;
    /// Blocks until an event channel is pending or a timeout.
    pub const POLL: u32 = 3;
}

/// `HVMOP_*` (hvm/hvm_op.h) and the parameter vmirq serves (hvm/params.h).
pub mod hvmop {
    /// Sets an HVM parameter.
    pub const SET_PARAM: u32 = 0;
    /// Reads an HVM parameter.
    pub const GET_PARAM: u32 = 1;
    /// Sets a vCPU's event-channel upcall vector.
    pub const SET_EVTCHN_UPCALL_VECTOR: u32 = 23;
    /// `HVM_PARAM_CALLBACK_IRQ`: where upcalls go without a per-vCPU vector.
    pub const PARAM_CALLBACK_IRQ: u32 = 0;
    /// `HVM_NR_PARAMS`.
    pub const NR_PARAMS: u32 = 39;
}

/// `PHYSDEVOP_*` (physdev.h).
pub mod physdevop {
    /// Reports whether a PIRQ needs an EOI.
    pub const IRQ_STATUS_QUERY: u32 = 5;
    /// EOIs a GSI PIRQ.
    pub const EOI: u32 = 12;
    /// Maps a GSI or MSI to a PIRQ.
    pub const MAP_PIRQ: u32 = 13;
    /// Gives a PIRQ back.
    pub const UNMAP_PIRQ: u32 = 14;
    /// Hands out a free PIRQ.
    pub const GET_FREE_PIRQ: u32 = 23;
}

/// `XENMEM_*` (memory.h).
pub mod xenmem {
    /// `XENMEM_add_to_physmap`.
    pub const ADD_TO_PHYSMAP: u32 = 7;
    /// `XENMAPSPACE_shared_info`.
    pub const SPACE_SHARED_INFO: u32 = 0;
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RegisterVcpuInfo {
    mfn: u64,
    offset: u32,
    rsvd: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Nanoseconds {
    ns: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct HvmParam {
    domid: u16,
    _pad: u16,
    index: u32,
    value: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UpcallVector {
    vcpu: u32,
    vector: u8,
    _pad: [u8; 3],
}

// SAFETY: `repr(C)` structs of unsigned integers with explicit padding (sizes checked below):
// every byte is initialized and every pattern is a valid value.
unsafe impl ByteValued for RegisterVcpuInfo {}
// SAFETY: as above.
unsafe impl ByteValued for Nanoseconds {}
// SAFETY: as above.
unsafe impl ByteValued for HvmParam {}
// SAFETY: as above.
unsafe impl ByteValued for UpcallVector {}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<RegisterVcpuInfo>() == 16);
    assert!(size_of::<Nanoseconds>() == 8);
    assert!(size_of::<HvmParam>() == 16);
    assert!(size_of::<UpcallVector>() == 8);
};

/// The guest-facing hypercalls of one guest's event channels and upcalls.
pub struct Hypercalls {
    channels: Arc<EventChannels>,
    upcalls: Arc<Upcalls>,
}

impl Hypercalls {
    /// Serves `channels` and `upcalls` (as [`super::attach`] returns them).
    pub fn new(channels: Arc<EventChannels>, upcalls: Arc<Upcalls>) -> Self {
        Self { channels, upcalls }
    }

    /// The event channels served.
    pub fn channels(&self) -> &Arc<EventChannels> {
        &self.channels
    }

    /// Hypercall `number` from `vcpu` with its first three arguments; returns Xen's result
    /// (0, a value, or a negative errno).
    pub fn call(&self, vcpu: u32, number: u32, args: [u64; 3]) -> i64 {
        tracing::trace!(vcpu, number, ?args, "Xen hypercall");
        let cmd = args[0] as u32;
        let r = match number {
            nr::EVENT_CHANNEL_OP => return self.channels.hypercall(vcpu, cmd, args[1]),
            nr::VCPU_OP => self.vcpu_op(vcpu, cmd, args[1] as u32, args[2]),
            nr::SCHED_OP => self.sched_op(vcpu, cmd, args[1]),
            nr::HVM_OP => self.hvm_op(cmd, args[1]),
            nr::MEMORY_OP => self.memory_op(cmd, args[1]),
            nr::PHYSDEV_OP => self.physdev_op(cmd, args[1]),
            _ => Err(XenError::NoSys),
        };
        match r {
            Ok(v) => v,
            Err(e) => -e.errno(),
        }
    }

    fn read<T: ByteValued>(&self, gpa: u64) -> Result<T, XenError> {
        self.channels
            .memory
            .read_obj(GuestAddress(gpa))
            .map_err(|_| XenError::Fault)
    }

    /// Xen `common_vcpu_op` / `arch_do_vcpu_op`: the target vCPU first (-ENOENT).
    fn vcpu_op(&self, caller: u32, cmd: u32, target: u32, arg: u64) -> Result<i64, XenError> {
        if target >= self.channels.config.vcpus {
            return Err(XenError::NoEntry);
        }
        let ch = &self.channels;
        match cmd {
            vcpuop::REGISTER_VCPU_INFO => {
                let info: RegisterVcpuInfo = self.read(arg)?;
                let gpa = info
                    .mfn
                    .checked_mul(0x1000)
                    .and_then(|base| base.checked_add(u64::from(info.offset)))
                    .ok_or(XenError::Invalid)?;
                ch.register_vcpu_info(target, gpa)?;
            }
            vcpuop::SET_SINGLESHOT_TIMER => {
                // Xen: a vCPU's own timer only, checked before the argument is read.
                if caller != target {
                    return Err(XenError::Invalid);
                }
                let t: Nanoseconds = self.read(arg)?;
                ch.set_singleshot_timer(caller, target, t.ns)?;
            }
            vcpuop::STOP_SINGLESHOT_TIMER => ch.stop_singleshot_timer(caller, target)?,
            vcpuop::SET_PERIODIC_TIMER => {
                let t: Nanoseconds = self.read(arg)?;
                ch.set_periodic_timer(target, t.ns)?;
            }
            vcpuop::STOP_PERIODIC_TIMER => ch.stop_periodic_timer(target)?,
            _ => return Err(XenError::NoSys),
        }
        Ok(0)
    }

    /// Xen `do_sched_op`: `SCHEDOP_poll` reads `struct sched_poll` at the guest's width
    /// (a 64-bit handle, u32 count, u64 timeout at 16; compat: u32 handle, timeout at 8).
    fn sched_op(&self, vcpu: u32, cmd: u32, arg: u64) -> Result<i64, XenError> {
        match cmd {
            schedop::YIELD => Ok(0),
            schedop::POLL => {
                let long = self.channels.layout().word_bytes == 8;
                let (ports_gpa, n, timeout) = if long {
                    let b: [u64; 3] = self.read(arg)?;
                    (b[0], b[1] as u32, b[2])
                } else {
                    let b: [u32; 4] = self.read(arg)?;
                    (
                        u64::from(b[0]),
                        b[1],
                        u64::from(b[2]) | u64::from(b[3]) << 32,
                    )
                };
                if n as usize > super::MAX_POLL_PORTS {
                    return Err(XenError::Invalid);
                }
                let ports = self.channels.read_ports(ports_gpa, n)?;
                self.channels.poll(vcpu, &ports, timeout)?;
                Ok(0)
            }
            _ => Err(XenError::NoSys),
        }
    }

    /// Xen `do_hvm_op`.
    fn hvm_op(&self, cmd: u32, arg: u64) -> Result<i64, XenError> {
        let bad = |e: UpcallError| match e {
            UpcallError::NoSuchVcpu(_) => XenError::NoEntry,
            _ => XenError::Invalid,
        };
        match cmd {
            hvmop::SET_EVTCHN_UPCALL_VECTOR => {
                // Xen hvmop_set_evtchn_upcall_vector: the vector (-EINVAL), then the vCPU.
                let a: UpcallVector = self.read(arg)?;
                if a.vector < 0x10 {
                    return Err(XenError::Invalid);
                }
                self.upcalls
                    .set_upcall_vector(a.vcpu, Some(a.vector))
                    .map_err(bad)?;
                Ok(0)
            }
            hvmop::SET_PARAM | hvmop::GET_PARAM => {
                let mut a: HvmParam = self.read(arg)?;
                self.channels.check_dom(a.domid)?;
                if a.index >= hvmop::NR_PARAMS {
                    return Err(XenError::Invalid);
                }
                if a.index != hvmop::PARAM_CALLBACK_IRQ {
                    return Err(XenError::NoSys);
                }
                if cmd == hvmop::GET_PARAM {
                    a.value = callback_param(self.upcalls.configuration().1);
                    self.channels
                        .memory
                        .write_obj(a, GuestAddress(arg))
                        .map_err(|_| XenError::Fault)?;
                    return Ok(0);
                }
                // Xen hvm_set_callback_via: the type in bits 63:56; a GSI of 0 (or value 0)
                // turns the callback off. PCI INTx callbacks are not emulated.
                let callback = match a.value >> 56 {
                    0 if a.value as u8 == 0 => Callback::None,
                    0 => Callback::Gsi(u32::from(a.value as u8)),
                    2 => Callback::Vector(a.value as u8),
                    _ => return Err(XenError::Invalid),
                };
                self.upcalls.set_callback(callback).map_err(bad)?;
                Ok(0)
            }
            _ => Err(XenError::NoSys),
        }
    }

    /// Xen `do_memory_op`: `XENMEM_add_to_physmap` of the shared_info page
    /// (`xenmem_add_to_physmap_one`), `struct xen_add_to_physmap` at the guest's width.
    fn memory_op(&self, cmd: u32, arg: u64) -> Result<i64, XenError> {
        if cmd != xenmem::ADD_TO_PHYSMAP {
            return Err(XenError::NoSys);
        }
        let long = self.channels.layout().word_bytes == 8;
        let (domid, space, idx, gpfn) = if long {
            let b: [u64; 3] = self.read(arg)?;
            (b[0] as u16, (b[0] >> 32) as u32, b[1], b[2])
        } else {
            let b: [u32; 4] = self.read(arg)?;
            (b[0] as u16, b[1], u64::from(b[2]), u64::from(b[3]))
        };
        self.channels.check_dom(domid)?;
        if space != xenmem::SPACE_SHARED_INFO || idx != 0 {
            return Err(XenError::Invalid);
        }
        let gpa = gpfn.checked_mul(0x1000).ok_or(XenError::Invalid)?;
        self.channels.move_shared_info(gpa)?;
        Ok(0)
    }
}

impl Hypercalls {
    /// Xen `do_physdev_op` for an HVM guest's own MSI PIRQs (QEMU `xen_physdev_*`). Each
    /// struct is `{u32/i32 first, u32 second}` but `map_pirq` (domid, type, index, pirq, ...).
    fn physdev_op(&self, cmd: u32, arg: u64) -> Result<i64, XenError> {
        use super::map_type;
        let ch = &self.channels;
        let write = |words: [u32; 2]| {
            ch.memory
                .write_obj(words, GuestAddress(arg))
                .map_err(|_| XenError::Fault)
        };
        match cmd {
            physdevop::GET_FREE_PIRQ => {
                let [kind, _]: [u32; 2] = self.read(arg)?;
                let pirq = ch.get_free_pirq(&mut ch.lock(), kind as i32)?;
                write([kind, pirq])?;
            }
            physdevop::MAP_PIRQ => {
                // struct physdev_map_pirq: domid, type, index (the GSI), pirq (IN/OUT).
                let mut a: [u32; 4] = self.read(arg)?;
                // QEMU xen_physdev_map_pirq: only this domain, and only GSIs: Xen answers an
                // HVM guest mapping its own MSIs with -EINVAL (they come from get_free_pirq).
                ch.check_self_only(a[0] as u16)?;
                if a[1] as i32 != map_type::GSI {
                    return Err(XenError::Invalid);
                }
                let gsi = a[2];
                if gsi >= super::pirq::IOAPIC_PINS {
                    return Err(XenError::Invalid);
                }
                let interrupts = self.upcalls.interrupts();
                // KVM drives a pin a kernel irqfd reaches: that pin cannot be a PIRQ's.
                if !interrupts.divert_pin(gsi) {
                    return Err(XenError::Busy);
                }
                let mapped = ch.map_gsi_pirq(&mut ch.lock(), gsi as i32, a[3] as i32);
                match mapped {
                    Ok(pirq) => a[3] = pirq,
                    Err(e) => {
                        if !ch.gsi_mapped(gsi) {
                            interrupts.undivert_pin(gsi, false, false);
                        }
                        return Err(e);
                    }
                }
                ch.memory
                    .write_obj(a, GuestAddress(arg))
                    .map_err(|_| XenError::Fault)?;
            }
            physdevop::UNMAP_PIRQ => {
                let [domid, pirq]: [u32; 2] = self.read(arg)?;
                ch.check_self_only(domid as u16)?;
                let mut t = ch.lock();
                ch.unmap_pirq(&mut t, pirq as i32)?;
                let gave_back = ch.unmap_gsi(&mut t, pirq);
                drop(t);
                // The pin's inputs go back to the IOAPIC at the levels they have now.
                if let Some((gsi, line, resampled)) = gave_back {
                    self.upcalls.interrupts().undivert_pin(gsi, line, resampled);
                }
            }
            physdevop::IRQ_STATUS_QUERY => {
                let [irq, _]: [u32; 2] = self.read(arg)?;
                let flags = ch.irq_status(irq)?;
                write([irq, flags])?;
            }
            physdevop::EOI => {
                let irq: u32 = self.read(arg)?;
                let gsi = ch.eoi_pirq(&ch.lock(), irq)?;
                // As at an IOAPIC EOI: the level irqfds' input dropped, their resamplefds
                // fire; then a line still high marks the port again.
                self.upcalls.interrupts().resample_pin(gsi);
                ch.reassert_gsi(gsi);
            }
            _ => return Err(XenError::NoSys),
        }
        Ok(0)
    }
}

/// HVM_PARAM_CALLBACK_IRQ's value for `callback` (Xen's encoding).
fn callback_param(callback: Callback) -> u64 {
    match callback {
        Callback::None => 0,
        Callback::Gsi(g) => u64::from(g),
        Callback::Vector(v) => 2 << 56 | u64::from(v),
    }
}
