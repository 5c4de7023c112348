use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::abi::{self, errno::*, op, stat};
use super::*;

pub(super) const RAM: usize = 0x10_0000;
pub(super) const SHINFO: u64 = 0x1_0000;
pub(super) const ARGS: u64 = 0x2000;
pub(super) const DOMID: u16 = 5;

#[derive(Default)]
pub(super) struct Recorder(pub Mutex<Vec<u32>>);

impl UpcallSink for Recorder {
    fn upcall(&self, vcpu: u32) {
        self.0.lock().unwrap().push(vcpu);
    }
}

impl Recorder {
    pub(super) fn take(&self) -> Vec<u32> {
        std::mem::take(&mut self.0.lock().unwrap())
    }
}

/// Event channels over plain guest memory, their upcalls recorded.
pub(super) struct Vm {
    pub(super) ec: Arc<EventChannels>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) up: Arc<Recorder>,
}

pub(super) fn vm_with(long_mode: bool, vcpus: u32) -> Vm {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let up = Arc::new(Recorder::default());
    let config = XenConfig {
        vcpus,
        long_mode,
        shared_info_gpa: SHINFO,
        domid: DOMID,
    };
    let ec = Arc::new(EventChannels::new(mem.clone(), config, up.clone()));
    Vm { ec, mem, up }
}

fn vm() -> Vm {
    vm_with(true, 2)
}

impl Vm {
    pub(super) fn call<T: ByteValued>(&self, cmd: u32, arg: T) -> (i64, T) {
        self.mem.write_obj(arg, GuestAddress(ARGS)).unwrap();
        let rc = self.ec.hypercall(0, cmd, ARGS);
        (rc, self.mem.read_obj(GuestAddress(ARGS)).unwrap())
    }

    pub(super) fn port_op(&self, cmd: u32, port: u32) -> i64 {
        self.call(cmd, abi::PortArg { port }).0
    }

    pub(super) fn alloc_unbound(&self, remote_dom: u16) -> u32 {
        let a = abi::AllocUnbound {
            dom: DOMID_SELF,
            remote_dom,
            port: 0,
        };
        let (rc, out) = self.call(op::ALLOC_UNBOUND, a);
        assert_eq!(rc, 0);
        out.port
    }

    pub(super) fn bind_ipi(&self, vcpu: u32) -> u32 {
        let (rc, out) = self.call(op::BIND_IPI, abi::BindIpi { vcpu, port: 0 });
        assert_eq!(rc, 0);
        out.port
    }

    pub(super) fn bind_virq(&self, virq: u32, vcpu: u32) -> (i64, u32) {
        let (rc, out) = self.call(
            op::BIND_VIRQ,
            abi::BindVirq {
                virq,
                vcpu,
                port: 0,
            },
        );
        (rc, out.port)
    }

    fn bind_interdomain(&self, remote_dom: u16, remote_port: u32) -> (i64, u32) {
        let a = abi::BindInterdomain {
            remote_dom,
            remote_port,
            ..Default::default()
        };
        let (rc, out) = self.call(op::BIND_INTERDOMAIN, a);
        (rc, out.local_port)
    }

    pub(super) fn bind_vcpu(&self, port: u32, vcpu: u32) -> i64 {
        self.call(op::BIND_VCPU, abi::BindVcpu { port, vcpu }).0
    }

    fn status(&self, dom: u16, port: u32) -> (i64, abi::Status) {
        let a = abi::Status {
            dom,
            port,
            ..Default::default()
        };
        self.call(op::STATUS, a)
    }

    fn mask(&self, port: u32) {
        let l = self.ec.layout();
        let (word, bit) = l.word_and_bit(port);
        let gpa = GuestAddress(SHINFO + l.mask + u64::from(word) * l.word_bytes);
        let w: u64 = self.mem.read_obj(gpa).unwrap();
        self.mem.write_obj(w | 1 << bit, gpa).unwrap();
    }

    pub(super) fn pending(&self, port: u32) -> bool {
        self.ec.port_status(port).pending
    }

    fn clear_pending(&self, port: u32) {
        let l = self.ec.layout();
        let (word, bit) = l.word_and_bit(port);
        let gpa = GuestAddress(SHINFO + l.pending + u64::from(word) * l.word_bytes);
        let w: u64 = self.mem.read_obj(gpa).unwrap();
        self.mem.write_obj(w & !(1 << bit), gpa).unwrap();
    }

    /// The guest's upcall handler: clear upcall_pending and the selector.
    fn ack_upcall(&self, vcpu: u32) {
        let l = self.ec.layout();
        let vi = SHINFO + l.vcpu_info(vcpu);
        self.mem.write_obj(0u8, GuestAddress(vi)).unwrap();
        self.mem.write_obj(0u64, GuestAddress(vi + 8)).unwrap();
    }
}

#[test]
fn errno_table() {
    let vm = vm();
    let ipi = vm.bind_ipi(0);
    let unbound = vm.alloc_unbound(DOMID_SELF);
    // send
    assert_eq!(
        vm.port_op(op::SEND, unbound),
        0,
        "unbound: silently dropped"
    );
    assert_eq!(vm.port_op(op::SEND, 0), -EINVAL);
    assert_eq!(vm.port_op(op::SEND, 4096), -EINVAL);
    assert_eq!(vm.port_op(op::SEND, 100), -EINVAL, "closed");
    // close
    assert_eq!(vm.port_op(op::CLOSE, 100), -EINVAL, "free port");
    assert_eq!(vm.port_op(op::CLOSE, 0), -EINVAL);
    // bind_virq
    let (rc, _) = vm.bind_virq(abi::VIRQ_TIMER, 1);
    assert_eq!(rc, 0);
    assert_eq!(vm.bind_virq(abi::VIRQ_TIMER, 1).0, -EEXIST);
    assert_eq!(vm.bind_virq(abi::VIRQ_TIMER, 2).0, -ENOENT, "bad vCPU");
    assert_eq!(vm.bind_virq(abi::NR_VIRQS, 0).0, -EINVAL);
    assert_eq!(
        vm.bind_virq(abi::VIRQ_CONSOLE, 1).0,
        -EINVAL,
        "global on vCPU 1"
    );
    // Xen get_global_virq_handler: global VIRQs are dom0's, after the vCPU check.
    assert_eq!(vm.bind_virq(abi::VIRQ_CONSOLE, 0).0, -EBUSY, "console");
    assert_eq!(vm.bind_virq(abi::VIRQ_DOM_EXC, 0).0, -EBUSY, "dom_exc");
    assert_eq!(vm.bind_virq(abi::VIRQ_CONSOLE, 9).0, -EINVAL);
    assert_eq!(vm.bind_virq(abi::VIRQ_ARGO, 1).0, -EINVAL, "per-domain");
    // bind_ipi
    assert_eq!(
        vm.call(op::BIND_IPI, abi::BindIpi { vcpu: 2, port: 0 }).0,
        -ENOENT
    );
    // bind_vcpu
    let timer = vm.ec.port_status(3);
    assert_eq!(timer.state, PortState::Virq(abi::VIRQ_TIMER));
    assert_eq!(vm.bind_vcpu(ipi, 1), -EINVAL, "IPI");
    assert_eq!(vm.bind_vcpu(3, 0), -EINVAL, "per-vCPU VIRQ");
    assert_eq!(vm.bind_vcpu(unbound, 7), -ENOENT);
    assert_eq!(vm.bind_vcpu(100, 1), -EINVAL, "closed");
    assert_eq!(vm.bind_vcpu(unbound, 1), 0);
    // status
    let (rc, s) = vm.status(DOMID_SELF, 100);
    assert_eq!((rc, s.status, s.vcpu), (0, stat::CLOSED, 0));
    // Port 0 is reserved: closed, successfully (Xen ECS_RESERVED).
    let (rc, s) = vm.status(DOMID, 0);
    assert_eq!((rc, s.status), (0, stat::CLOSED), "port 0");
    assert_eq!(vm.status(DOMID, 4096).0, -EINVAL);
    assert_eq!(vm.status(DOMID + 1, 1).0, -ESRCH);
    assert_eq!(vm.status(DOMID_BACKEND, 1).0, -EPERM, "dom0: XSM_TARGET");
    // alloc_unbound
    let a = |dom, remote_dom| abi::AllocUnbound {
        dom,
        remote_dom,
        port: 0,
    };
    assert_eq!(vm.call(op::ALLOC_UNBOUND, a(9, DOMID_SELF)).0, -ESRCH);
    assert_eq!(
        vm.call(op::ALLOC_UNBOUND, a(DOMID_BACKEND, DOMID_SELF)).0,
        -EPERM
    );
    // Any remote domain is accepted and reported; nothing can bind it here.
    let (rc, out) = vm.call(op::ALLOC_UNBOUND, a(DOMID_SELF, 9));
    assert_eq!(rc, 0);
    let (rc, s) = vm.status(DOMID_SELF, out.port);
    assert_eq!((rc, s.status, s.u_dom), (0, stat::UNBOUND, 9));
    assert_eq!(
        vm.ec.port_status(out.port).state,
        PortState::Unbound {
            remote: Remote::Domain(9)
        }
    );
    assert_eq!(vm.bind_interdomain(9, out.port).0, -ESRCH);
    assert_eq!(vm.bind_interdomain(DOMID_SELF, out.port).0, -EINVAL);
    assert_eq!(vm.port_op(op::SEND, out.port), 0, "unbound: dropped");
    assert_eq!(vm.port_op(op::CLOSE, out.port), 0);
    // bind_interdomain
    assert_eq!(vm.bind_interdomain(9, unbound).0, -ESRCH);
    assert_eq!(
        vm.bind_interdomain(DOMID_SELF, ipi).0,
        -EINVAL,
        "not unbound"
    );
    assert_eq!(vm.bind_interdomain(DOMID_SELF, 0).0, -EINVAL);
    assert_eq!(
        vm.bind_interdomain(DOMID_BACKEND, 7).0,
        -ENOENT,
        "no backend port"
    );
    let be = vm.ec.alloc_backend_unbound().unwrap();
    assert_eq!(vm.bind_interdomain(DOMID_BACKEND, be.port).0, 0);
    assert_eq!(vm.bind_interdomain(DOMID_BACKEND, be.port).0, -EBUSY);
    // reset, reset_cont, pirq, FIFO and unknown ops
    assert_eq!(vm.call(op::RESET, abi::Reset { dom: 9 }).0, -ESRCH);
    assert_eq!(
        vm.call(op::RESET, abi::Reset { dom: DOMID_BACKEND }).0,
        -EPERM
    );
    assert_eq!(vm.call(op::RESET_CONT, abi::Reset { dom: 9 }).0, -ESRCH);
    assert_eq!(
        vm.call(op::RESET_CONT, abi::Reset { dom: DOMID_SELF }).0,
        -EBUSY,
        "no reset in progress"
    );
    let pirq = abi::BindPirq {
        pirq: NR_PIRQS,
        ..Default::default()
    };
    assert_eq!(vm.call(op::BIND_PIRQ, pirq).0, -EINVAL);
    assert_eq!(
        vm.call(op::EXPAND_ARRAY, abi::ExpandArray::default()).0,
        -EOPNOTSUPP
    );
    let prio = |port| abi::SetPriority { port, priority: 3 };
    assert_eq!(vm.call(op::SET_PRIORITY, prio(4096)).0, -EINVAL, "bad port");
    assert_eq!(vm.call(op::SET_PRIORITY, prio(ipi)).0, -ENOSYS, "2-level");
    assert_eq!(vm.call(op::SET_PRIORITY, prio(0)).0, -ENOSYS, "reserved");
    assert_eq!(vm.ec.hypercall(0, 99, ARGS), -ENOSYS);
    // EFAULT for every command that reads an argument: outside RAM, and a struct straddling
    // the end of RAM.
    for cmd in 0..=op::RESET_CONT {
        assert_eq!(vm.ec.hypercall(0, cmd, 0x20_0000), -EFAULT, "cmd {cmd}");
        let size = abi::arg_size(cmd).unwrap() as u64;
        assert_eq!(
            vm.ec.hypercall(0, cmd, RAM as u64 - size + 1),
            -EFAULT,
            "cmd {cmd}"
        );
    }
    assert_eq!(vm.ec.hypercall(0, op::SEND, u64::MAX - 1), -EFAULT);
    assert_eq!(vm.call(op::RESET, abi::Reset { dom: DOMID_SELF }).0, 0);
    assert_eq!(vm.ec.port_status(ipi).state, PortState::Closed);
}

#[test]
fn full_table_is_enospc() {
    let vm = vm_with(false, 1);
    for port in 1..1024 {
        assert_eq!(vm.bind_ipi(0), port);
    }
    assert_eq!(vm.call(op::BIND_IPI, abi::BindIpi::default()).0, -ENOSPC);
    // Xen evtchn_bind_interdomain: the remote domain first, then a free local port, and only
    // then the remote port.
    assert_eq!(vm.bind_interdomain(9, 0).0, -ESRCH);
    assert_eq!(
        vm.bind_interdomain(DOMID_SELF, 0).0,
        -ENOSPC,
        "bad remote port"
    );
    assert_eq!(
        vm.bind_interdomain(DOMID_BACKEND, 7).0,
        -ENOSPC,
        "no backend port"
    );
}

#[test]
fn masked_port_gets_pending_but_no_upcall_until_unmask() {
    let vm = vm();
    let p = vm.bind_ipi(1);
    vm.mask(p);
    assert_eq!(vm.port_op(op::SEND, p), 0);
    assert!(vm.pending(p));
    assert!(!vm.ec.upcall_pending(1));
    assert!(vm.up.take().is_empty());
    assert_eq!(vm.port_op(op::UNMASK, p), 0);
    assert!(vm.ec.upcall_pending(1));
    assert_eq!(vm.up.take(), vec![1]);
    assert!(!vm.ec.port_status(p).masked);
}

#[test]
fn set_pending_reports_each_outcome() {
    let vm = vm();
    let p = vm.bind_ipi(0);
    let q = vm.bind_ipi(0);
    assert_eq!(vm.ec.set_pending(p, 0), Ok(SetPending::Raised));
    assert_eq!(vm.ec.set_pending(p, 0), Ok(SetPending::Coalesced));
    assert_eq!(vm.ec.set_pending(q, 0), Ok(SetPending::SelectorAlreadySet));
    vm.ack_upcall(0);
    vm.clear_pending(p);
    vm.mem.write_obj(1u8, GuestAddress(SHINFO)).unwrap();
    assert_eq!(
        vm.ec.set_pending(p, 0),
        Ok(SetPending::UpcallAlreadyPending)
    );
    vm.mask(q);
    vm.clear_pending(q);
    assert_eq!(vm.ec.set_pending(q, 0), Ok(SetPending::Masked));
    assert_eq!(vm.up.take(), vec![0]);
    assert_eq!(vm.ec.set_pending(0, 0), Err(XenError::Invalid));
    assert_eq!(vm.ec.set_pending(p, 2), Err(XenError::NoEntry));
    assert_eq!(vm.ec.set_pending(50, 0), Err(XenError::Closed));
}

#[test]
fn loopback_interdomain_send_marks_the_other_end() {
    let vm = vm();
    let a = vm.alloc_unbound(DOMID_SELF);
    let (rc, b) = vm.bind_interdomain(DOMID, a);
    assert_eq!((rc, b), (0, a + 1));
    // Xen sets the new local end pending conservatively.
    assert!(vm.pending(b));
    vm.clear_pending(b);
    assert_eq!(vm.port_op(op::SEND, a), 0);
    assert!(vm.pending(b) && !vm.pending(a));
    vm.clear_pending(b);
    assert_eq!(vm.port_op(op::SEND, b), 0);
    assert!(vm.pending(a) && !vm.pending(b));
    let (_, s) = vm.status(DOMID_SELF, a);
    assert_eq!((s.status, s.u_dom, s.u_port), (stat::INTERDOMAIN, DOMID, b));
    // Closing one end leaves the other unbound (Xen __evtchn_close).
    assert_eq!(vm.port_op(op::CLOSE, a), 0);
    let unbound = PortState::Unbound {
        remote: Remote::Guest,
    };
    assert_eq!(vm.ec.port_status(b).state, unbound);
    assert!(!vm.pending(a), "close clears pending");
}

#[test]
fn ipi_to_self_sets_selector_and_raises() {
    let vm = vm_with(true, 2);
    let p = vm.bind_ipi(1);
    assert_eq!(vm.port_op(op::SEND, p), 0);
    assert!(vm.pending(p));
    let sel: u64 = vm.mem.read_obj(GuestAddress(SHINFO + 64 + 8)).unwrap();
    assert_eq!(sel, 1, "word 0 selected on vCPU 1");
    assert!(vm.ec.upcall_pending(1) && !vm.ec.upcall_pending(0));
    assert_eq!(vm.up.take(), vec![1]);
}

#[test]
fn virq_bind_and_raise() {
    let vm = vm();
    let (rc, timer) = vm.bind_virq(abi::VIRQ_TIMER, 1);
    assert_eq!(rc, 0);
    assert_eq!(
        vm.ec.raise_virq(abi::VIRQ_TIMER, 0),
        Ok(()),
        "unbound on vCPU 0: dropped"
    );
    assert!(!vm.pending(timer));
    assert_eq!(vm.ec.raise_virq(abi::VIRQ_TIMER, 1), Ok(()));
    assert!(vm.pending(timer));
    assert_eq!(vm.up.take(), vec![1]);
    // A VIRQ bound on vCPU 0 that is not per-vCPU (Argo's, per-domain) follows bind_vcpu.
    let (rc, argo) = vm.bind_virq(abi::VIRQ_ARGO, 0);
    assert_eq!(rc, 0);
    assert_eq!(vm.bind_vcpu(argo, 1), 0);
    vm.ack_upcall(1);
    assert_eq!(vm.ec.raise_virq(abi::VIRQ_ARGO, 0), Ok(()));
    assert_eq!(vm.up.take(), vec![1]);
    assert_eq!(
        vm.port_op(op::SEND, argo),
        -EINVAL,
        "VIRQ ports are Xen's to send on"
    );
    assert_eq!(vm.ec.raise_virq(abi::NR_VIRQS, 0), Err(XenError::Invalid));
    assert_eq!(vm.port_op(op::CLOSE, timer), 0);
    assert_eq!(
        vm.bind_virq(abi::VIRQ_TIMER, 1).0,
        0,
        "rebindable after close"
    );
}

#[test]
fn backend_notify_eventfd_written_on_guest_send() {
    let vm = vm();
    let gp = vm.alloc_unbound(DOMID_BACKEND);
    assert_eq!(vm.ec.bind_backend(gp + 1).unwrap_err(), XenError::Invalid);
    let be = vm.ec.bind_backend(gp).unwrap();
    assert_eq!(vm.port_op(op::SEND, gp), 0);
    assert_eq!(vm.port_op(op::SEND, gp), 0);
    assert_eq!(be.notify.read().unwrap(), 2);
    let (_, s) = vm.status(DOMID_SELF, gp);
    assert_eq!(
        (s.status, s.u_dom, s.u_port),
        (stat::INTERDOMAIN, 0, be.port)
    );
    // Backend to guest.
    assert_eq!(vm.ec.notify_port(gp), Ok(()));
    assert!(vm.pending(gp));
    // Backend goes away: the guest port waits for a backend again.
    vm.ec.unbind_backend(be.port).unwrap();
    let s = vm.ec.port_status(gp).state;
    assert_eq!(
        s,
        PortState::Unbound {
            remote: Remote::Backend
        }
    );
}

#[test]
fn layout_offsets_64_bit_and_compat() {
    let l = Layout::LONG_MODE;
    assert_eq!(
        (l.pending, l.mask, l.wallclock, l.pending_sel),
        (0x800, 0xA00, 0xC00, 8)
    );
    assert_eq!(l.word_and_bit(65), (1, 1));
    let c = Layout::COMPAT;
    assert_eq!(
        (c.pending, c.mask, c.wallclock, c.pending_sel),
        (0x800, 0x880, 0x900, 4)
    );
    assert_eq!(c.word_and_bit(33), (1, 1));
    assert_eq!((l.ports, c.ports), (4096, 1024));

    for (long_mode, port, word_gpa, sel_gpa) in
        [(true, 65, 0x808, 64 + 8), (false, 33, 0x804, 64 + 4)]
    {
        let vm = vm_with(long_mode, 2);
        for _ in 0..port {
            vm.bind_ipi(1);
        }
        assert_eq!(vm.ec.set_pending(port, 1), Ok(SetPending::Raised));
        let word: u32 = vm.mem.read_obj(GuestAddress(SHINFO + word_gpa)).unwrap();
        let sel: u32 = vm.mem.read_obj(GuestAddress(SHINFO + sel_gpa)).unwrap();
        let upcall: u8 = vm.mem.read_obj(GuestAddress(SHINFO + 64)).unwrap();
        assert_eq!(
            (word, sel, upcall),
            (0b10, 0b10, 1),
            "long_mode {long_mode}"
        );
    }
}

#[test]
fn allocation_takes_the_lowest_free_port_and_never_port_0() {
    let vm = vm();
    assert_eq!([vm.bind_ipi(0), vm.bind_ipi(0), vm.bind_ipi(0)], [1, 2, 3]);
    assert_eq!(vm.port_op(op::CLOSE, 2), 0);
    assert_eq!(vm.alloc_unbound(DOMID_SELF), 2);
    assert_eq!(vm.bind_ipi(0), 4);
    assert_eq!(vm.ec.notify_port(0), Err(XenError::Invalid));
    // Xen evtchn_unmask: port 0 is valid (reserved), so unmasking it succeeds.
    assert_eq!(vm.port_op(op::UNMASK, 0), 0);
    assert_eq!(vm.port_op(op::UNMASK, 4096), -EINVAL);
    assert_eq!(vm.ec.port_status(0).state, PortState::Closed);
}

#[test]
fn bind_vcpu_changes_only_the_ports_vcpu() {
    let vm = vm();
    let p = vm.alloc_unbound(DOMID_SELF);
    assert_eq!(vm.ec.set_pending(p, 0), Ok(SetPending::Raised));
    vm.ack_upcall(0);
    // Xen evtchn_bind_vcpu raises nothing on the new vCPU (Linux masks around the move and
    // its unmask raises the event).
    assert_eq!(vm.bind_vcpu(p, 1), 0);
    assert_eq!(vm.up.take(), vec![0]);
    assert_eq!(vm.ec.port_status(p).vcpu, 1);
    assert!(!vm.ec.upcall_pending(1));
    // The next event goes to vCPU 1.
    vm.clear_pending(p);
    assert_eq!(vm.ec.notify_port(p), Ok(()));
    assert_eq!(vm.up.take(), vec![1]);
}

/// Senders hammer a port that the slow path keeps closing and rebinding: after every close the
/// port's pending bit must be clear, and stay clear until the port is bound again.
#[test]
fn close_racing_send_never_leaves_a_closed_port_pending() {
    let vm = Arc::new(vm());
    let stop = Arc::new(AtomicBool::new(false));
    let senders: Vec<_> = (0..3)
        .map(|i| {
            let (vm, stop) = (vm.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = match i {
                        0 => vm.ec.set_pending(1, 0).map(drop),
                        1 => vm.ec.notify_port(1),
                        _ => vm.ec.raise_virq(abi::VIRQ_TIMER, 1),
                    };
                    // Play the guest: consume the event.
                    vm.clear_pending(1);
                }
            })
        })
        .collect();
    for round in 0..3000 {
        let port = match round % 3 {
            0 => vm.bind_ipi(1),
            1 => vm.bind_virq(abi::VIRQ_TIMER, 1).1,
            _ => {
                let a = vm.alloc_unbound(DOMID_SELF);
                assert_eq!(vm.bind_vcpu(a, 1), 0);
                a
            }
        };
        assert_eq!(port, 1);
        std::thread::yield_now();
        assert_eq!(vm.port_op(op::CLOSE, 1), 0);
        for _ in 0..3 {
            assert!(!vm.pending(1), "closed port pending in round {round}");
            std::thread::yield_now();
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.join().unwrap();
    }
}

#[test]
fn a_vcpu_info_the_guest_placed_itself_receives_the_upcall_bits() {
    let vm = vm();
    let port = vm.bind_ipi(1);
    let placed = SHINFO + 0x1000 + 0x40;
    // Xen map_guest_area: misaligned for the 64-bit ABI, or crossing a page, is -ENXIO.
    assert_eq!(
        vm.ec.register_vcpu_info(1, placed + 4),
        Err(XenError::BadArea),
        "misaligned"
    );
    assert_eq!(
        vm.ec.register_vcpu_info(1, SHINFO + 0x1fe0),
        Err(XenError::BadArea),
        "crosses a page"
    );
    assert_eq!(
        vm.ec.register_vcpu_info(1, RAM as u64 + 0x1000),
        Err(XenError::Invalid),
        "outside RAM"
    );
    assert_eq!(vm.ec.register_vcpu_info(9, placed), Err(XenError::NoEntry));
    vm.ec.register_vcpu_info(1, placed).unwrap();
    assert_eq!(vm.ec.vcpu_info_gpa(1), Some(placed));
    // Xen: a second registration is -EBUSY.
    assert_eq!(
        vm.ec.register_vcpu_info(1, placed + 0x100),
        Err(XenError::Busy)
    );
    // Registration marks everything pending, as Xen's map_vcpu_info does.
    assert!(vm.ec.upcall_pending(1));
    assert_eq!(
        vm.mem.read_obj::<u64>(GuestAddress(placed + 8)).unwrap(),
        u64::MAX,
        "every selector bit set"
    );
    assert_eq!(vm.up.take(), [1]);
    vm.mem.write_obj(0u8, GuestAddress(placed)).unwrap();
    vm.mem.write_obj(0u64, GuestAddress(placed + 8)).unwrap();
    let legacy = SHINFO + vm.ec.layout().vcpu_info(1);
    vm.mem.write_obj(0u8, GuestAddress(legacy)).unwrap();
    vm.mem.write_obj(0u64, GuestAddress(legacy + 8)).unwrap();
    assert_eq!(vm.port_op(abi::op::SEND, port), 0);
    assert_eq!(vm.up.take(), [1]);
    assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(placed)).unwrap(), 1);
    assert_ne!(vm.mem.read_obj::<u64>(GuestAddress(placed + 8)).unwrap(), 0);
    assert_eq!(
        vm.mem.read_obj::<u8>(GuestAddress(legacy)).unwrap(),
        0,
        "old slot untouched"
    );
}

#[test]
fn registration_raises_the_upcall_even_with_upcall_pending_already_set() {
    let vm = vm();
    // The legacy slot already says upcall_pending (copied over): Xen's arch_evtchn_inject
    // raises the upcall anyway, or the guest would wait for a 0→1 that never comes.
    let p = vm.bind_ipi(0);
    assert_eq!(vm.port_op(op::SEND, p), 0);
    assert_eq!(vm.up.take(), [0]);
    vm.ec.register_vcpu_info(0, SHINFO + 0x2000).unwrap();
    assert_eq!(vm.up.take(), [0]);
}

#[test]
fn a_vcpu_info_at_guest_address_0_is_honoured() {
    for long_mode in [true, false] {
        let vm = vm_with(long_mode, 2);
        vm.ec.register_vcpu_info(1, 0).unwrap();
        assert_eq!(vm.ec.vcpu_info_gpa(1), Some(0));
        vm.up.take();
        vm.mem.write_obj(0u8, GuestAddress(0)).unwrap();
        let sel = vm.ec.layout().pending_sel;
        vm.mem.write_obj(0u64, GuestAddress(sel)).unwrap();
        let p = vm.bind_ipi(1);
        assert_eq!(vm.port_op(op::SEND, p), 0);
        assert_eq!(vm.up.take(), [1], "long_mode {long_mode}");
        assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        assert_ne!(vm.mem.read_obj::<u64>(GuestAddress(sel)).unwrap(), 0);
        // The legacy slot, where the guest no longer looks, got nothing.
        let legacy = SHINFO + vm.ec.layout().vcpu_info(1);
        assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(legacy)).unwrap(), 0);
    }
}

#[test]
fn a_compat_vcpu_info_needs_only_4_byte_alignment() {
    let vm = vm_with(false, 2);
    assert_eq!(
        vm.ec.register_vcpu_info(1, SHINFO + 0x1002),
        Err(XenError::BadArea)
    );
    vm.ec.register_vcpu_info(1, SHINFO + 0x1004).unwrap();
    let vm = vm_with(true, 2);
    assert_eq!(
        vm.ec.register_vcpu_info(1, SHINFO + 0x1004),
        Err(XenError::BadArea),
        "64-bit: 8-byte alignment"
    );
}

#[test]
fn vcpus_from_32_on_have_no_vcpu_info_until_they_register_one() {
    let vm = vm_with(true, 200);
    assert_eq!(vm.ec.config().vcpus, 128, "Xen's HVM limit");
    let (rc, timer) = vm.bind_virq(abi::VIRQ_TIMER, 127);
    assert_eq!(rc, 0);
    let ipi = vm.bind_ipi(40);
    // Events mark the port pending in shared_info and raise nothing (Xen's dummy vcpu_info).
    assert_eq!(vm.ec.raise_virq(abi::VIRQ_TIMER, 127), Ok(()));
    assert_eq!(vm.ec.set_pending(ipi, 40), Ok(SetPending::NoVcpuInfo));
    assert!(vm.pending(timer) && vm.pending(ipi));
    assert!(vm.up.take().is_empty());
    assert!(!vm.ec.upcall_pending(40));
    // The registration starts from zeros with the upcall mask set (vcpu_info_populate), then
    // marks every selector and raises the upcall: the events sent before are found.
    let area = SHINFO + 0x3000;
    vm.mem.write_slice(&[0xAA; 64], GuestAddress(area)).unwrap();
    vm.ec.register_vcpu_info(40, area).unwrap();
    assert_eq!(vm.up.take(), [40]);
    assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(area)).unwrap(), 1);
    assert_eq!(vm.mem.read_obj::<u8>(GuestAddress(area + 1)).unwrap(), 1);
    assert_eq!(
        vm.mem.read_obj::<u64>(GuestAddress(area + 8)).unwrap(),
        u64::MAX
    );
    assert_eq!(vm.mem.read_obj::<u64>(GuestAddress(area + 16)).unwrap(), 0);
    // From now on vCPU 40 is served like any other.
    vm.mem.write_obj(0u8, GuestAddress(area)).unwrap();
    vm.mem.write_obj(0u64, GuestAddress(area + 8)).unwrap();
    vm.clear_pending(ipi);
    assert_eq!(vm.ec.set_pending(ipi, 40), Ok(SetPending::Raised));
    assert_eq!(vm.up.take(), [40]);
    // vCPU 127 still has none.
    assert_eq!(vm.ec.register_vcpu_info(128, area), Err(XenError::NoEntry));
    assert!(!vm.ec.upcall_pending(127));
}
