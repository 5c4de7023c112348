//! The guest-visible ABI of `HYPERVISOR_event_channel_op`: command numbers, status values, Xen
//! errno values and the argument structs with the exact layouts of
//! `xen/include/public/event_channel.h` (`domid_t` is u16, `evtchn_port_t` is u32).
//!
//! Every struct spells its padding out as a `_pad` field: `ByteValued` reads and writes whole
//! structs, and compiler-inserted padding would be uninitialized memory. Fields are in host
//! byte order, which is the guest's (little-endian x86).

use vm_memory::ByteValued;

#[cfg(not(target_endian = "little"))]
compile_error!("the Xen ABI structs are read in host byte order, which must be little-endian");

/// `EVTCHNOP_*` command numbers (event_channel.h).
pub mod op {
    pub const BIND_INTERDOMAIN: u32 = 0;
    pub const BIND_VIRQ: u32 = 1;
    pub const BIND_PIRQ: u32 = 2;
    pub const CLOSE: u32 = 3;
    pub const SEND: u32 = 4;
    pub const STATUS: u32 = 5;
    pub const ALLOC_UNBOUND: u32 = 6;
    pub const BIND_IPI: u32 = 7;
    pub const BIND_VCPU: u32 = 8;
    pub const UNMASK: u32 = 9;
    pub const RESET: u32 = 10;
    pub const INIT_CONTROL: u32 = 11;
    pub const EXPAND_ARRAY: u32 = 12;
    pub const SET_PRIORITY: u32 = 13;
}

/// `EVTCHNSTAT_*` values returned by `EVTCHNOP_status`.
pub mod stat {
    pub const CLOSED: u32 = 0;
    pub const UNBOUND: u32 = 1;
    pub const INTERDOMAIN: u32 = 2;
    pub const PIRQ: u32 = 3;
    pub const VIRQ: u32 = 4;
    pub const IPI: u32 = 5;
}

/// Xen errno values (xen/include/public/errno.h); hypercalls return their negation.
pub mod errno {
    pub const EPERM: i64 = 1;
    pub const ENOENT: i64 = 2;
    pub const ESRCH: i64 = 3;
    pub const EFAULT: i64 = 14;
    pub const EBUSY: i64 = 16;
    pub const EEXIST: i64 = 17;
    pub const EINVAL: i64 = 22;
    pub const ENOSPC: i64 = 28;
    pub const ENOSYS: i64 = 38;
}

/// "This domain" in a `domid_t` argument (xen.h).
pub const DOMID_SELF: u16 = 0x7FF0;
/// The domain the VMM's own backends answer as. QEMU's Xen emulation uses 0 (`DOMID_QEMU`), the
/// id a real dom0 would have, so guests written for Xen find their backends where they expect.
pub const DOMID_BACKEND: u16 = 0;

/// `NR_VIRQS` (xen.h).
pub const NR_VIRQS: u32 = 24;
pub const VIRQ_TIMER: u32 = 0;
pub const VIRQ_DEBUG: u32 = 1;
pub const VIRQ_CONSOLE: u32 = 2;
pub const VIRQ_XENOPROF: u32 = 7;
pub const VIRQ_XENPMU: u32 = 13;

/// Per-vCPU VIRQs are bound on the vCPU they name; all others are global: bound on vCPU 0 and
/// movable with `bind_vcpu` (Xen event_channel.c `virq_is_global`; QEMU adds XENPMU, as does
/// xen.h, which marks it "V." for per-vCPU).
pub fn virq_is_global(virq: u32) -> bool {
    !matches!(virq, VIRQ_TIMER | VIRQ_DEBUG | VIRQ_XENOPROF | VIRQ_XENPMU)
}

/// An error with a Xen errno. Variants sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum XenError {
    /// The port exists but is closed, or is being closed right now.
    #[error("port is closed")]
    Closed,
    #[error("an argument lies outside guest memory")]
    Fault,
    #[error("already in use")]
    Busy,
    #[error("already bound")]
    Exists,
    #[error("invalid argument")]
    Invalid,
    #[error("creating an eventfd failed (os error {0})")]
    Io(i32),
    #[error("no such vCPU or backend port")]
    NoEntry,
    #[error("no free port")]
    NoSpace,
    #[error("operation not implemented")]
    NoSys,
    #[error("no such domain")]
    NoSuchDomain,
    #[error("operation not permitted")]
    Permission,
}

impl XenError {
    /// The positive Xen errno a hypercall reports for this error.
    pub fn errno(self) -> i64 {
        match self {
            XenError::Closed | XenError::Invalid => errno::EINVAL,
            XenError::Fault => errno::EFAULT,
            XenError::Busy => errno::EBUSY,
            XenError::Exists => errno::EEXIST,
            // Not produced by hypercalls; the closest Xen errno.
            XenError::Io(_) => errno::ENOSPC,
            XenError::NoEntry => errno::ENOENT,
            XenError::NoSpace => errno::ENOSPC,
            XenError::NoSys => errno::ENOSYS,
            XenError::NoSuchDomain => errno::ESRCH,
            XenError::Permission => errno::EPERM,
        }
    }
}

/// `struct evtchn_alloc_unbound`: IN dom, remote_dom; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocUnbound {
    pub dom: u16,
    pub remote_dom: u16,
    pub port: u32,
}

/// `struct evtchn_bind_interdomain`: IN remote_dom, remote_port; OUT local_port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindInterdomain {
    pub remote_dom: u16,
    pub _pad: u16,
    pub remote_port: u32,
    pub local_port: u32,
}

/// `struct evtchn_bind_virq`: IN virq, vcpu; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindVirq {
    pub virq: u32,
    pub vcpu: u32,
    pub port: u32,
}

/// `struct evtchn_bind_pirq`: IN pirq, flags; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindPirq {
    pub pirq: u32,
    pub flags: u32,
    pub port: u32,
}

/// `struct evtchn_bind_ipi`: IN vcpu; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindIpi {
    pub vcpu: u32,
    pub port: u32,
}

/// `struct evtchn_close`, `evtchn_send` and `evtchn_unmask`: IN port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortArg {
    pub port: u32,
}

/// `struct evtchn_status`: IN dom, port; OUT status, vcpu and the union `u` (8 bytes at 16:
/// unbound.dom u16 | interdomain {dom u16, port u32 at 20} | pirq u32 | virq u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    pub dom: u16,
    pub _pad: u16,
    pub port: u32,
    pub status: u32,
    pub vcpu: u32,
    /// `u.unbound.dom`, `u.interdomain.dom`, or the low half of `u.pirq` / `u.virq`.
    pub u_dom: u16,
    pub u_pad: u16,
    /// `u.interdomain.port`.
    pub u_port: u32,
}

impl Status {
    /// Writes `u.pirq` / `u.virq` (a u32 at the start of the union).
    pub fn set_u32(&mut self, v: u32) {
        self.u_dom = v as u16;
        self.u_pad = (v >> 16) as u16;
    }
}

/// `struct evtchn_bind_vcpu`: IN port, vcpu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindVcpu {
    pub port: u32,
    pub vcpu: u32,
}

/// `struct evtchn_reset`: IN dom.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reset {
    pub dom: u16,
}

/// `struct evtchn_init_control` (FIFO ABI; only its size is used until FIFO is implemented).
pub const INIT_CONTROL_SIZE: usize = 24;

// SAFETY: all of these are `repr(C)` structs of unsigned integers whose explicit `_pad` fields
// leave no implicit padding (checked by the size assertions below), so every byte pattern is a
// valid value and every byte is initialized.
unsafe impl ByteValued for AllocUnbound {}
// SAFETY: as above.
unsafe impl ByteValued for BindInterdomain {}
// SAFETY: as above.
unsafe impl ByteValued for BindVirq {}
// SAFETY: as above.
unsafe impl ByteValued for BindPirq {}
// SAFETY: as above.
unsafe impl ByteValued for BindIpi {}
// SAFETY: as above.
unsafe impl ByteValued for PortArg {}
// SAFETY: as above.
unsafe impl ByteValued for Status {}
// SAFETY: as above.
unsafe impl ByteValued for BindVcpu {}
// SAFETY: as above.
unsafe impl ByteValued for Reset {}

const _: () = {
    use std::mem::size_of;
    assert!(size_of::<AllocUnbound>() == 8);
    assert!(size_of::<BindInterdomain>() == 12);
    assert!(size_of::<BindVirq>() == 12);
    assert!(size_of::<BindPirq>() == 12);
    assert!(size_of::<BindIpi>() == 8);
    assert!(size_of::<PortArg>() == 4);
    assert!(size_of::<Status>() == 24);
    assert!(size_of::<BindVcpu>() == 8);
    assert!(size_of::<Reset>() == 2);
};

/// Bytes of the argument struct `cmd` reads, or `None` for commands answered without reading
/// their argument (FIFO ops and unknown commands, -ENOSYS).
pub fn arg_size(cmd: u32) -> Option<usize> {
    use std::mem::size_of;
    Some(match cmd {
        op::BIND_INTERDOMAIN => size_of::<BindInterdomain>(),
        op::BIND_VIRQ => size_of::<BindVirq>(),
        op::BIND_PIRQ => size_of::<BindPirq>(),
        op::CLOSE | op::SEND | op::UNMASK => size_of::<PortArg>(),
        op::STATUS => size_of::<Status>(),
        op::ALLOC_UNBOUND => size_of::<AllocUnbound>(),
        op::BIND_IPI => size_of::<BindIpi>(),
        op::BIND_VCPU => size_of::<BindVcpu>(),
        op::RESET => size_of::<Reset>(),
        _ => return None,
    })
}
