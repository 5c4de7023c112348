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
    /// `EVTCHNOP_bind_interdomain`: connects a new local port to a remote domain's unbound port.
    pub const BIND_INTERDOMAIN: u32 = 0;
    /// `EVTCHNOP_bind_virq`: binds a virtual IRQ on a vCPU to a new port.
    pub const BIND_VIRQ: u32 = 1;
    /// `EVTCHNOP_bind_pirq`: binds a physical IRQ to a new port.
    pub const BIND_PIRQ: u32 = 2;
    /// `EVTCHNOP_close`: closes a port.
    pub const CLOSE: u32 = 3;
    /// `EVTCHNOP_send`: notifies the other end of a port.
    pub const SEND: u32 = 4;
    /// `EVTCHNOP_status`: reports a port's binding.
    pub const STATUS: u32 = 5;
    /// `EVTCHNOP_alloc_unbound`: allocates a port that a remote domain may bind later.
    pub const ALLOC_UNBOUND: u32 = 6;
    /// `EVTCHNOP_bind_ipi`: allocates a port whose sends notify a vCPU of the same domain.
    pub const BIND_IPI: u32 = 7;
    /// `EVTCHNOP_bind_vcpu`: changes the vCPU a port notifies.
    pub const BIND_VCPU: u32 = 8;
    /// `EVTCHNOP_unmask`: clears a port's mask bit, raising the upcall if it is pending.
    pub const UNMASK: u32 = 9;
    /// `EVTCHNOP_reset`: closes every port of a domain.
    pub const RESET: u32 = 10;
    /// `EVTCHNOP_init_control`: registers a vCPU's FIFO control block (FIFO ABI).
    pub const INIT_CONTROL: u32 = 11;
    /// `EVTCHNOP_expand_array`: adds a page to the FIFO event array (FIFO ABI).
    pub const EXPAND_ARRAY: u32 = 12;
    /// `EVTCHNOP_set_priority`: sets a port's FIFO priority (FIFO ABI).
    pub const SET_PRIORITY: u32 = 13;
    /// `EVTCHNOP_reset_cont`: continues an `EVTCHNOP_reset` that was preempted.
    pub const RESET_CONT: u32 = 14;
}

/// `EVTCHNSTAT_*` values returned by `EVTCHNOP_status`.
pub mod stat {
    /// `EVTCHNSTAT_closed`: the port is not in use.
    pub const CLOSED: u32 = 0;
    /// `EVTCHNSTAT_unbound`: the port waits for a remote domain to bind it.
    pub const UNBOUND: u32 = 1;
    /// `EVTCHNSTAT_interdomain`: the port is connected to a remote port.
    pub const INTERDOMAIN: u32 = 2;
    /// `EVTCHNSTAT_pirq`: the port is bound to a physical IRQ.
    pub const PIRQ: u32 = 3;
    /// `EVTCHNSTAT_virq`: the port is bound to a virtual IRQ.
    pub const VIRQ: u32 = 4;
    /// `EVTCHNSTAT_ipi`: the port is bound to a vCPU for IPIs.
    pub const IPI: u32 = 5;
}

/// Xen errno values (xen/include/public/errno.h); hypercalls return their negation.
pub mod errno {
    /// Operation not permitted.
    pub const EPERM: i64 = 1;
    /// No such entry (vCPU, backend port).
    pub const ENOENT: i64 = 2;
    /// No such domain.
    pub const ESRCH: i64 = 3;
    /// No such device or address (a guest area crossing a page or misaligned).
    pub const ENXIO: i64 = 6;
    /// Bad guest address.
    pub const EFAULT: i64 = 14;
    /// Resource busy.
    pub const EBUSY: i64 = 16;
    /// Already exists (already bound).
    pub const EEXIST: i64 = 17;
    /// Invalid argument.
    pub const EINVAL: i64 = 22;
    /// No space left (no free port).
    pub const ENOSPC: i64 = 28;
    /// Function not implemented.
    pub const ENOSYS: i64 = 38;
    /// Operation not supported (an ABI this domain does not have, e.g. FIFO).
    pub const EOPNOTSUPP: i64 = 95;
}

/// "This domain" in a `domid_t` argument (xen.h).
pub const DOMID_SELF: u16 = 0x7FF0;
/// The domain the VMM's own backends answer as. QEMU's Xen emulation uses 0 (`DOMID_QEMU`), the
/// id a real dom0 would have, so guests written for Xen find their backends where they expect.
pub const DOMID_BACKEND: u16 = 0;

/// `NR_VIRQS` (xen.h).
pub const NR_VIRQS: u32 = 24;
/// `VIRQ_TIMER`: per-vCPU timer (timebase update or requested timeout).
pub const VIRQ_TIMER: u32 = 0;
/// `VIRQ_DEBUG`: per-vCPU request to dump debug information.
pub const VIRQ_DEBUG: u32 = 1;
/// `VIRQ_CONSOLE`: global, bytes received on the emergency console.
pub const VIRQ_CONSOLE: u32 = 2;
/// `VIRQ_DOM_EXC`: global, a domain crashed or shut down (dom0's).
pub const VIRQ_DOM_EXC: u32 = 3;
/// `VIRQ_XENOPROF`: per-vCPU, a new Xenoprofile sample is available.
pub const VIRQ_XENOPROF: u32 = 7;
/// `VIRQ_ARGO`: per-domain, an Argo ring has space or a message.
pub const VIRQ_ARGO: u32 = 11;
/// `VIRQ_XENPMU`: per-vCPU PMC interrupt.
pub const VIRQ_XENPMU: u32 = 13;

/// Per-vCPU VIRQs are bound on the vCPU they name; all others are bound on vCPU 0 and movable
/// with `bind_vcpu` (Xen event_channel.c `virq_is_global`; QEMU adds XENPMU, as does
/// xen.h, which marks it "V." for per-vCPU).
pub fn virq_is_global(virq: u32) -> bool {
    virq_type(virq) != VirqType::Vcpu
}

/// Who a VIRQ belongs to (Xen event_channel.c `get_virq_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirqType {
    /// One per vCPU, bound on the vCPU it names.
    Vcpu,
    /// One per domain, bound on vCPU 0 (`VIRQ_ARGO`).
    Domain,
    /// One for the whole host, handled by dom0 (console, dom_exc, ...): a guest's bind is
    /// -EBUSY (`get_global_virq_handler` is the hardware domain).
    Global,
}

/// The type of `virq` (below [`NR_VIRQS`]); x86's arch VIRQs are global.
pub fn virq_type(virq: u32) -> VirqType {
    match virq {
        VIRQ_TIMER | VIRQ_DEBUG | VIRQ_XENOPROF | VIRQ_XENPMU => VirqType::Vcpu,
        VIRQ_ARGO => VirqType::Domain,
        _ => VirqType::Global,
    }
}

/// An error with a Xen errno. Variants sorted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum XenError {
    /// The port exists but is closed, or is being closed right now.
    #[error("port is closed")]
    Closed,
    /// A guest area crosses a page boundary or is misaligned for the ABI width (-ENXIO, Xen
    /// `map_guest_area`).
    #[error("the guest area crosses a page or is misaligned")]
    BadArea,
    /// An argument or guest structure lies outside guest memory or is misaligned (-EFAULT).
    #[error("an argument lies outside guest memory")]
    Fault,
    /// The resource is already in use, e.g. a backend port already connected (-EBUSY).
    #[error("already in use")]
    Busy,
    /// The VIRQ is already bound on that vCPU (-EEXIST).
    #[error("already bound")]
    Exists,
    /// A bad port, VIRQ or address, or a port in the wrong state for the operation (-EINVAL).
    #[error("invalid argument")]
    Invalid,
    /// Creating an eventfd failed with this OS errno; not produced by hypercalls.
    #[error("creating an eventfd failed (os error {0})")]
    Io(i32),
    /// No such vCPU or backend port (-ENOENT).
    #[error("no such vCPU or backend port")]
    NoEntry,
    /// Every port (or backend port) is in use (-ENOSPC).
    #[error("no free port")]
    NoSpace,
    /// The operation is not implemented (-ENOSYS), e.g. FIFO priorities on 2-level ports.
    #[error("operation not implemented")]
    NoSys,
    /// The domain does not have that ABI (-EOPNOTSUPP), e.g. FIFO event channels.
    #[error("operation not supported")]
    NotSupported,
    /// The domain is neither this guest nor the backend domain where one is accepted (-ESRCH).
    #[error("no such domain")]
    NoSuchDomain,
    /// The operation is not allowed for that domain (-EPERM).
    #[error("operation not permitted")]
    Permission,
}

impl XenError {
    /// The error a hypercall's negative result `-errno` stands for (EINVAL reads as
    /// [`XenError::Invalid`]); `None` for a result that is not one of Xen's errnos.
    pub fn from_result(result: i64) -> Option<Self> {
        Some(match result.checked_neg()? {
            errno::EINVAL => XenError::Invalid,
            errno::EFAULT => XenError::Fault,
            errno::EBUSY => XenError::Busy,
            errno::EEXIST => XenError::Exists,
            errno::ENOENT => XenError::NoEntry,
            errno::ENOSPC => XenError::NoSpace,
            errno::ENOSYS => XenError::NoSys,
            errno::ENXIO => XenError::BadArea,
            errno::EOPNOTSUPP => XenError::NotSupported,
            errno::ESRCH => XenError::NoSuchDomain,
            errno::EPERM => XenError::Permission,
            _ => return None,
        })
    }

    /// The positive Xen errno a hypercall reports for this error.
    pub fn errno(self) -> i64 {
        match self {
            XenError::Closed | XenError::Invalid => errno::EINVAL,
            XenError::BadArea => errno::ENXIO,
            XenError::Fault => errno::EFAULT,
            XenError::Busy => errno::EBUSY,
            XenError::Exists => errno::EEXIST,
            // Not produced by hypercalls; the closest Xen errno.
            XenError::Io(_) => errno::ENOSPC,
            XenError::NoEntry => errno::ENOENT,
            XenError::NoSpace => errno::ENOSPC,
            XenError::NoSys => errno::ENOSYS,
            XenError::NotSupported => errno::EOPNOTSUPP,
            XenError::NoSuchDomain => errno::ESRCH,
            XenError::Permission => errno::EPERM,
        }
    }
}

/// `struct evtchn_alloc_unbound`: IN dom, remote_dom; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocUnbound {
    /// IN: the allocating domain; must be [`DOMID_SELF`] or the guest's own id.
    pub dom: u16,
    /// IN: the domain allowed to bind the other end.
    pub remote_dom: u16,
    /// OUT: the allocated port.
    pub port: u32,
}

/// `struct evtchn_bind_interdomain`: IN remote_dom, remote_port; OUT local_port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindInterdomain {
    /// IN: the domain owning the remote port.
    pub remote_dom: u16,
    /// Padding; aligns `remote_port`.
    pub _pad: u16,
    /// IN: the remote domain's unbound port.
    pub remote_port: u32,
    /// OUT: the new local port.
    pub local_port: u32,
}

/// `struct evtchn_bind_virq`: IN virq, vcpu; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindVirq {
    /// IN: the VIRQ number, below [`NR_VIRQS`].
    pub virq: u32,
    /// IN: the vCPU to notify; 0 for global VIRQs.
    pub vcpu: u32,
    /// OUT: the new port.
    pub port: u32,
}

/// `struct evtchn_bind_pirq`: IN pirq, flags; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindPirq {
    /// IN: the physical IRQ.
    pub pirq: u32,
    /// IN: `BIND_PIRQ__WILL_SHARE` or 0.
    pub flags: u32,
    /// OUT: the new port.
    pub port: u32,
}

/// `struct evtchn_bind_ipi`: IN vcpu; OUT port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BindIpi {
    /// IN: the vCPU to notify.
    pub vcpu: u32,
    /// OUT: the new port.
    pub port: u32,
}

/// `struct evtchn_close`, `evtchn_send` and `evtchn_unmask`: IN port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortArg {
    /// IN: the port.
    pub port: u32,
}

/// `struct evtchn_status`: IN dom, port; OUT status, vcpu and the union `u` (8 bytes at 16:
/// unbound.dom u16 | interdomain {dom u16, port u32 at 20} | pirq u32 | virq u32).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Status {
    /// IN: the domain owning the port; must be [`DOMID_SELF`] or the guest's own id.
    pub dom: u16,
    /// Padding; aligns `port`.
    pub _pad: u16,
    /// IN: the port queried.
    pub port: u32,
    /// OUT: an `EVTCHNSTAT_*` value ([`stat`]).
    pub status: u32,
    /// OUT: the vCPU the port notifies.
    pub vcpu: u32,
    /// `u.unbound.dom`, `u.interdomain.dom`, or the low half of `u.pirq` / `u.virq`.
    pub u_dom: u16,
    /// The high half of `u.pirq` / `u.virq`; padding otherwise.
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
    /// IN: the port.
    pub port: u32,
    /// IN: the vCPU to notify from now on.
    pub vcpu: u32,
}

/// `struct evtchn_reset`: IN dom.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reset {
    /// IN: the domain whose ports to close; must be [`DOMID_SELF`] or the guest's own id.
    pub dom: u16,
}

/// `struct evtchn_init_control` (FIFO ABI): IN control_gfn, offset, vcpu; OUT link_bits.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InitControl {
    /// IN: the guest frame of the vCPU's control block.
    pub control_gfn: u64,
    /// IN: the control block's offset in that frame.
    pub offset: u32,
    /// IN: the vCPU.
    pub vcpu: u32,
    /// OUT: bits of the LINK field.
    pub link_bits: u8,
    /// Padding to the struct's 8-byte alignment.
    pub _pad: [u8; 7],
}

/// `struct evtchn_expand_array` (FIFO ABI): IN array_gfn.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExpandArray {
    /// IN: the guest frame of the next event-array page.
    pub array_gfn: u64,
}

/// `struct evtchn_set_priority` (FIFO ABI): IN port, priority.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetPriority {
    /// IN: the port.
    pub port: u32,
    /// IN: the priority, 0 (highest) to 15.
    pub priority: u32,
}

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
// SAFETY: as above.
unsafe impl ByteValued for InitControl {}
// SAFETY: as above.
unsafe impl ByteValued for ExpandArray {}
// SAFETY: as above.
unsafe impl ByteValued for SetPriority {}

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
    assert!(size_of::<InitControl>() == 24);
    assert!(size_of::<ExpandArray>() == 8);
    assert!(size_of::<SetPriority>() == 8);
};

/// Bytes of the argument struct `cmd` reads, or `None` for unknown commands (-ENOSYS, answered
/// without reading an argument).
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
        op::RESET | op::RESET_CONT => size_of::<Reset>(),
        op::INIT_CONTROL => size_of::<InitControl>(),
        op::EXPAND_ARRAY => size_of::<ExpandArray>(),
        op::SET_PRIORITY => size_of::<SetPriority>(),
        _ => return None,
    })
}
