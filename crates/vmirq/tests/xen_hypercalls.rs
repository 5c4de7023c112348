//! The Xen hypercall dispatcher ([`vmirq::xen::Hypercalls`]) by hypercall number: each
//! operation a Linux HVM guest makes for its event channels answers as Xen does.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmirq::xen::hypercall::{hvmop, nr, schedop, vcpuop, xenmem};
use vmirq::xen::{attach, Hypercalls, XenConfig};
use vmirq::{Config, Interrupts, IrqchipMode, SimBackend};

const ARGS: u64 = 0x1000;
const SHINFO: u64 = 0x2_0000;
const EPERM: i64 = -1;
const ENOENT: i64 = -2;
const EFAULT: i64 = -14;
const EBUSY: i64 = -16;
const EINVAL: i64 = -22;
const ENOSYS: i64 = -38;

fn guest(long_mode: bool) -> (Hypercalls, GuestMemoryMmap) {
    let irq = Interrupts::new(SimBackend::new(2, IrqchipMode::Kernel), Config::default()).unwrap();
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let config = XenConfig {
        vcpus: 2,
        long_mode,
        shared_info_gpa: SHINFO,
        domid: 1,
    };
    let (channels, upcalls) = attach(&irq, mem.clone(), config);
    (Hypercalls::new(channels, upcalls), mem)
}

fn write(mem: &GuestMemoryMmap, words: &[u64]) {
    for (i, w) in words.iter().enumerate() {
        mem.write_obj(*w, GuestAddress(ARGS + 8 * i as u64))
            .unwrap();
    }
}

#[test]
fn vcpu_ops_place_vcpu_info_and_arm_timers() {
    let (h, mem) = guest(true);
    let call = |cmd, vcpu, arg| h.call(0, nr::VCPU_OP, [cmd, vcpu, arg]);
    // struct vcpu_register_vcpu_info {u64 mfn; u32 offset; u32 rsvd}
    write(&mem, &[0x30, 0x40]);
    assert_eq!(call(u64::from(vcpuop::REGISTER_VCPU_INFO), 2, ARGS), ENOENT);
    assert_eq!(call(u64::from(vcpuop::REGISTER_VCPU_INFO), 1, ARGS), 0);
    assert_eq!(h.channels().vcpu_info_gpa(1), Some(0x30040));
    assert_eq!(call(u64::from(vcpuop::REGISTER_VCPU_INFO), 1, ARGS), EBUSY);
    assert_eq!(
        call(u64::from(vcpuop::REGISTER_VCPU_INFO), 0, 0x20_0000),
        EFAULT
    );
    // The single-shot timer is the caller's own; a deadline already past raises VIRQ_TIMER.
    write(&mem, &[0, 0]); // bind_virq {VIRQ_TIMER, vCPU 0}
    assert_eq!(h.call(0, nr::EVENT_CHANNEL_OP, [1, ARGS, 0]), 0);
    let timer: u32 = mem.read_obj(GuestAddress(ARGS + 8)).unwrap();
    write(&mem, &[1]);
    assert_eq!(
        call(u64::from(vcpuop::SET_SINGLESHOT_TIMER), 1, ARGS),
        EINVAL
    );
    assert_eq!(call(u64::from(vcpuop::SET_SINGLESHOT_TIMER), 0, ARGS), 0);
    assert!(h.channels().port_status(timer).pending);
    assert_eq!(call(u64::from(vcpuop::STOP_SINGLESHOT_TIMER), 1, 0), EINVAL);
    assert_eq!(call(u64::from(vcpuop::STOP_SINGLESHOT_TIMER), 0, 0), 0);
    // Periodic: 1 ms at least.
    write(&mem, &[999_999]);
    assert_eq!(call(u64::from(vcpuop::SET_PERIODIC_TIMER), 1, ARGS), EINVAL);
    write(&mem, &[3_600_000_000_000]);
    assert_eq!(call(u64::from(vcpuop::SET_PERIODIC_TIMER), 1, ARGS), 0);
    assert_eq!(call(u64::from(vcpuop::STOP_PERIODIC_TIMER), 1, 0), 0);
    assert_eq!(call(99, 0, ARGS), ENOSYS);
}

#[test]
fn hvm_ops_set_the_upcall_vector_and_the_callback() {
    let (h, mem) = guest(false);
    let call = |cmd, arg| h.call(0, nr::HVM_OP, [cmd, arg, 0]);
    // struct xen_hvm_evtchn_upcall_vector {u32 vcpu; u8 vector}
    let vector = |vcpu: u64, v: u64| write(&mem, &[vcpu | v << 32]);
    let op = u64::from(hvmop::SET_EVTCHN_UPCALL_VECTOR);
    vector(1, 0x0f);
    assert_eq!(call(op, ARGS), EINVAL, "below 0x10");
    vector(5, 0xf3);
    assert_eq!(call(op, ARGS), ENOENT);
    vector(1, 0xf3);
    assert_eq!(call(op, ARGS), 0);
    // struct xen_hvm_param {u16 domid; u32 index @4; u64 value @8}
    let param = |domid: u64, index: u64, value: u64| write(&mem, &[domid | index << 32, value]);
    let (set, get) = (u64::from(hvmop::SET_PARAM), u64::from(hvmop::GET_PARAM));
    param(0x7FF0, 0, 2 << 56 | 0xf4);
    assert_eq!(call(set, ARGS), 0);
    param(0x7FF0, 0, 0);
    assert_eq!(call(get, ARGS), 0);
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(ARGS + 8)).unwrap(),
        2 << 56 | 0xf4
    );
    param(0, 0, 0);
    assert_eq!(call(set, ARGS), EPERM, "dom0");
    param(1, 39, 0);
    assert_eq!(call(set, ARGS), EINVAL, "past HVM_NR_PARAMS");
    param(1, 1, 0);
    assert_eq!(call(set, ARGS), ENOSYS, "a parameter the VMM serves");
    param(1, 0, 1 << 56 | 3);
    assert_eq!(
        call(set, ARGS),
        EINVAL,
        "PCI INTx callbacks are not emulated"
    );
    param(1, 0, 0);
    assert_eq!(call(set, ARGS), 0, "callback off");
    param(1, 0, 0);
    assert_eq!(call(get, ARGS), 0);
    assert_eq!(mem.read_obj::<u64>(GuestAddress(ARGS + 8)).unwrap(), 0);
    assert_eq!(call(99, ARGS), ENOSYS);
}

#[test]
fn sched_poll_and_add_to_physmap_read_their_structs_at_the_guests_width() {
    for long_mode in [true, false] {
        let (h, mem) = guest(long_mode);
        let poll = |arg| h.call(0, nr::SCHED_OP, [u64::from(schedop::POLL), arg, 0]);
        mem.write_obj(1u32, GuestAddress(0x3000)).unwrap(); // the port array: port 1
        let sched_poll = |ports: u64, n: u64, timeout: u64| {
            if long_mode {
                write(&mem, &[ports, n, timeout]);
            } else {
                write(&mem, &[ports | n << 32, timeout]);
            }
        };
        sched_poll(0x3000, 1, 1);
        assert_eq!(poll(ARGS), 0, "a timeout in the past returns at once");
        sched_poll(0x3000, 129, 1);
        assert_eq!(poll(ARGS), EINVAL);
        sched_poll(0x20_0000, 1, 1);
        assert_eq!(poll(ARGS), EFAULT);
        assert_eq!(
            h.call(0, nr::SCHED_OP, [u64::from(schedop::YIELD), 0, 0]),
            0
        );
        assert_eq!(h.call(0, nr::SCHED_OP, [99, 0, 0]), ENOSYS);
        // struct xen_add_to_physmap {u16 domid; u16 size; u32 space; ulong idx; pfn gpfn}
        let add = |domid: u64, space: u64, idx: u64, gpfn: u64| {
            if long_mode {
                write(&mem, &[domid | space << 32, idx, gpfn]);
            } else {
                write(&mem, &[domid | space << 32, idx | gpfn << 32]);
            }
            h.call(
                0,
                nr::MEMORY_OP,
                [u64::from(xenmem::ADD_TO_PHYSMAP), ARGS, 0],
            )
        };
        assert_eq!(add(0x7FF0, 0, 1, 0x50), EINVAL, "idx");
        assert_eq!(add(0x7FF0, 2, 0, 0x50), EINVAL, "space");
        assert_eq!(add(0, 0, 0, 0x50), EPERM);
        assert_eq!(add(0x7FF0, 0, 0, 0x5000), EINVAL, "outside RAM");
        assert_eq!(add(0x7FF0, 0, 0, 0x50), 0);
        assert_eq!(h.channels().config().shared_info_gpa, 0x50000);
        assert_eq!(h.call(0, nr::MEMORY_OP, [1, ARGS, 0]), ENOSYS);
        assert_eq!(h.call(0, 7, [0, 0, 0]), ENOSYS, "an unknown hypercall");
    }
}

#[test]
fn physdev_ops_hand_out_msi_pirqs_as_xen_does() {
    use vmirq::xen::hypercall::physdevop;
    use vmirq::xen::map_type;
    let (h, mem) = guest(false);
    let call = |cmd: u32, words: &[u64]| {
        write(&mem, words);
        h.call(0, nr::PHYSDEV_OP, [u64::from(cmd), ARGS, 0])
    };
    let out = || mem.read_obj::<u32>(GuestAddress(ARGS + 4)).unwrap();
    // QEMU allocate_pirq: GSIs from 16 up, MSIs from 255 down.
    assert_eq!(call(physdevop::GET_FREE_PIRQ, &[map_type::GSI as u64]), 0);
    assert_eq!(out(), 16);
    assert_eq!(call(physdevop::GET_FREE_PIRQ, &[map_type::MSI as u64]), 0);
    assert_eq!(out(), 255);
    assert_eq!(call(physdevop::GET_FREE_PIRQ, &[map_type::MSI as u64]), 0);
    assert_eq!(out(), 254);
    assert_eq!(h.channels().allocated_pirqs(), [16, 254, 255]);
    // map_pirq {domid, type, index, pirq}: MSIs -EINVAL, dom0 -EPERM, GSIs of the IOAPIC's
    // 24 pins (pirq -1: allocate; a PIRQ mapped already: -EBUSY).
    let map = |domid: u64, kind: i32, gsi: u32, pirq: i32| {
        let w0 = domid | (kind as u32 as u64) << 32;
        let w1 = u64::from(gsi) | (pirq as u32 as u64) << 32;
        call(physdevop::MAP_PIRQ, &[w0, w1, 0, 0, 0])
    };
    let mapped = || mem.read_obj::<u32>(GuestAddress(ARGS + 12)).unwrap();
    assert_eq!(map(0x7FF0, map_type::MSI, 0, -1), EINVAL);
    assert_eq!(map(0, map_type::MSI, 0, -1), EPERM);
    assert_eq!(map(0x7FF0, map_type::GSI, 24, -1), EINVAL);
    assert_eq!(map(0x7FF0, map_type::GSI, 9, -1), 0);
    assert_eq!(mapped(), 17, "the next free GSI PIRQ");
    assert_eq!(map(0x7FF0, map_type::GSI, 8, 17), EBUSY);
    assert_eq!(map(0x7FF0, map_type::GSI, 8, 101), 0);
    assert_eq!(mapped(), 101, "a PIRQ the guest names");
    assert!(h.channels().gsi_mapped(9) && h.channels().gsi_mapped(8));
    // unmap_pirq {domid, pirq}.
    let unmap =
        |domid: u64, pirq: i32| call(physdevop::UNMAP_PIRQ, &[domid | (pirq as u32 as u64) << 32]);
    assert_eq!(unmap(0x7FF0, 256), EINVAL);
    assert_eq!(unmap(0x7FF0, -1), EINVAL);
    assert_eq!(unmap(0x7FF0, 100), ENOENT);
    assert_eq!(unmap(5, 255), EPERM);
    assert_eq!(unmap(0x7FF0, 255), 0);
    assert_eq!(h.channels().allocated_pirqs(), [16, 17, 101, 254]);
    // irq_status_query {irq, flags out}: MSI PIRQs need no EOI; eoi of one is -EINVAL.
    assert_eq!(call(physdevop::IRQ_STATUS_QUERY, &[254 | 0xdead << 32]), 0);
    assert_eq!(out(), 0);
    assert_eq!(call(physdevop::IRQ_STATUS_QUERY, &[256]), EINVAL);
    assert_eq!(call(physdevop::IRQ_STATUS_QUERY, &[17]), 0);
    assert_eq!(out(), 1, "a GSI PIRQ needs an EOI");
    assert_eq!(call(physdevop::EOI, &[17]), 0);
    assert_eq!(unmap(0x7FF0, 101), 0);
    assert!(!h.channels().gsi_mapped(8), "unmapped");
    assert_eq!(call(physdevop::EOI, &[254]), EINVAL);
    assert_eq!(call(physdevop::EOI, &[100]), ENOENT);
    assert_eq!(call(physdevop::EOI, &[256]), EINVAL);
    assert_eq!(call(99, &[0]), ENOSYS);
    assert_eq!(h.call(0, nr::PHYSDEV_OP, [5, 0x20_0000, 0]), EFAULT);
}
