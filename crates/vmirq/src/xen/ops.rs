//! The `EVTCHNOP_*` operations (Xen xen/common/event_channel.c; QEMU hw/i386/kvm/xen_evtchn.c
//! where Xen-on-KVM differs). Each runs with the table mutex held and argument structs already
//! read from guest memory.

use std::sync::atomic::Ordering;

use super::abi::{self, virq_is_global, virq_type, VirqType, NR_VIRQS};
use super::ports::{Binding, Table};
use super::{EventChannels, PortState, Remote, XenError, DOMID_BACKEND};

impl EventChannels {
    /// Xen `evtchn_alloc_unbound`: any `remote_dom` is accepted and reported by status; only
    /// this guest (loopback) and the VMM's backends can ever bind such a port here.
    pub(super) fn alloc_unbound(
        &self,
        t: &mut Table,
        a: &mut abi::AllocUnbound,
    ) -> Result<(), XenError> {
        self.check_dom(a.dom)?;
        let remote = if a.remote_dom == DOMID_BACKEND {
            Remote::Backend
        } else if self.is_self(a.remote_dom) {
            Remote::Guest
        } else {
            Remote::Domain(a.remote_dom)
        };
        a.port = self.alloc(t, PortState::Unbound { remote }, 0)?;
        Ok(())
    }

    /// Xen `evtchn_bind_interdomain`'s order: the remote domain (-ESRCH), a free local port
    /// (-ENOSPC, before the remote port is looked at), then the remote port. The local port is
    /// taken only once everything checked, so a failed bind leaves no trace.
    pub(super) fn bind_interdomain(
        &self,
        t: &mut Table,
        a: &mut abi::BindInterdomain,
    ) -> Result<(), XenError> {
        let rp = a.remote_port;
        let backend = a.remote_dom == DOMID_BACKEND;
        if !backend && !self.is_self(a.remote_dom) {
            return Err(XenError::NoSuchDomain);
        }
        self.free_port(t).ok_or(XenError::NoSpace)?;
        let lp = if backend {
            // QEMU `xen_evtchn_bind_interdomain_op`: the backend port must exist (-ENOENT) and
            // be unconnected (-EBUSY).
            self.check_port(rp)?;
            match t.backends.get(rp as usize) {
                Some(Some(slot)) if slot.guest_port == 0 => {}
                Some(Some(_)) => return Err(XenError::Busy),
                _ => return Err(XenError::NoEntry),
            }
            let remote = Remote::Backend;
            let lp = self.alloc(
                t,
                PortState::Interdomain {
                    remote,
                    remote_port: rp,
                },
                0,
            )?;
            if let Some(Some(slot)) = t.backends.get_mut(rp as usize) {
                slot.guest_port = lp;
            }
            lp
        } else {
            // Xen: the remote port must be unbound and waiting for this domain (-EINVAL).
            self.check_port(rp)?;
            let remote = Remote::Guest;
            if t.state(rp) != (PortState::Unbound { remote }) {
                return Err(XenError::Invalid);
            }
            let lp = self.alloc(
                t,
                PortState::Interdomain {
                    remote,
                    remote_port: rp,
                },
                0,
            )?;
            self.set_state(
                t,
                rp,
                PortState::Interdomain {
                    remote,
                    remote_port: lp,
                },
            );
            lp
        };
        a.local_port = lp;
        // Xen: "We may have lost notifications on the remote unbound port. Fix that up here by
        // conservatively always setting a notification on the local port."
        let _ = self.deliver(lp);
        Ok(())
    }

    /// Xen `evtchn_bind_virq`'s order: range (-EINVAL), a non-per-vCPU VIRQ on a vCPU other
    /// than 0 (-EINVAL), the vCPU (-ENOENT), a global VIRQ, which is the hardware domain's
    /// (`get_global_virq_handler`: -EBUSY), already bound (-EEXIST).
    pub(super) fn bind_virq(&self, t: &mut Table, a: &mut abi::BindVirq) -> Result<(), XenError> {
        if a.virq >= NR_VIRQS || (virq_is_global(a.virq) && a.vcpu != 0) {
            return Err(XenError::Invalid);
        }
        if a.vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        if virq_type(a.virq) == VirqType::Global {
            return Err(XenError::Busy);
        }
        let entry = &self.virqs[(a.vcpu * NR_VIRQS + a.virq) as usize];
        if entry.load(Ordering::Acquire) != 0 {
            return Err(XenError::Exists);
        }
        a.port = self.alloc(t, PortState::Virq(a.virq), a.vcpu)?;
        entry.store(a.port, Ordering::Release);
        Ok(())
    }

    pub(super) fn bind_ipi(&self, t: &mut Table, a: &mut abi::BindIpi) -> Result<(), XenError> {
        if a.vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        a.port = self.alloc(t, PortState::Ipi, a.vcpu)?;
        Ok(())
    }

    pub(super) fn send(&self, t: &Table, a: &mut abi::PortArg) -> Result<(), XenError> {
        self.check_port(a.port)?;
        match t.state(a.port) {
            // Delivery failures (shared_info outside RAM) are not the sender's error.
            PortState::Interdomain {
                remote: Remote::Guest,
                remote_port,
            } => drop(self.deliver(remote_port)),
            PortState::Interdomain {
                remote: Remote::Backend,
                remote_port,
            } => {
                if let Some(Some(slot)) = t.backends.get(remote_port as usize) {
                    let _ = slot.notify.write(1);
                }
            }
            PortState::Ipi => drop(self.deliver(a.port)),
            // Xen: "silently drop the notification". No port is ever connected to another
            // domain here.
            PortState::Unbound { .. }
            | PortState::Interdomain {
                remote: Remote::Domain(_),
                ..
            } => {}
            // Xen: VIRQ and PIRQ ports are Xen's to send on; closed ports are invalid.
            PortState::Closed | PortState::Virq(_) | PortState::Pirq(_) => {
                return Err(XenError::Invalid)
            }
        }
        Ok(())
    }

    /// Fills the OUT fields Xen sets for the state and leaves the rest of the struct as the
    /// guest wrote it (Xen copies the whole struct back). Port 0 is reserved and reads closed
    /// (Xen `evtchn_status`: `ECS_RESERVED` reports `EVTCHNSTAT_closed`).
    pub(super) fn status(&self, t: &Table, a: &mut abi::Status) -> Result<(), XenError> {
        self.check_dom(a.dom)?;
        if a.port != 0 {
            self.check_port(a.port)?;
        }
        let state = t.state(a.port);
        a.status = state.stat();
        a.vcpu = t.vcpu(a.port);
        let dom = |remote| match remote {
            Remote::Guest => self.config.domid,
            Remote::Backend => DOMID_BACKEND,
            Remote::Domain(d) => d,
        };
        match state {
            PortState::Closed | PortState::Ipi => {}
            PortState::Unbound { remote } => a.u_dom = dom(remote),
            PortState::Interdomain {
                remote,
                remote_port,
            } => {
                a.u_dom = dom(remote);
                a.u_port = remote_port;
            }
            PortState::Pirq(n) | PortState::Virq(n) => a.set_u32(n),
        }
        Ok(())
    }

    /// Xen `evtchn_set_priority`: a port beyond the table is -EINVAL. On 2-level every other
    /// one, port 0 and free ports included, is -ENOSYS (no priorities); on FIFO a port the
    /// table holds takes priorities 0..=15 (`evtchn_fifo_set_priority`).
    pub(super) fn set_priority(
        &self,
        t: &mut Table,
        a: &mut abi::SetPriority,
    ) -> Result<(), XenError> {
        let ops = self.port_ops();
        let valid = if self.is_fifo() {
            a.port < t.len()
        } else {
            a.port < self.max_ports()
        };
        if !valid {
            return Err(XenError::Invalid);
        }
        ops.set_priority(self, t, a.port, a.priority)
    }

    pub(super) fn bind_vcpu(&self, t: &mut Table, a: &mut abi::BindVcpu) -> Result<(), XenError> {
        // Xen checks the vCPU before the port.
        if a.vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
        }
        self.check_port(a.port)?;
        match t.state(a.port) {
            PortState::Virq(v) if virq_is_global(v) => {}
            PortState::Unbound { .. } | PortState::Interdomain { .. } | PortState::Pirq(_) => {}
            // IPIs and per-vCPU VIRQs are tied to their vCPU; closed ports are invalid.
            _ => return Err(XenError::Invalid),
        }
        // Xen `evtchn_bind_vcpu` changes the port's vCPU and nothing else: no event is raised
        // on the new vCPU (Linux masks the port around the move and unmasks it after).
        let state = t.state(a.port);
        t.set(a.port, state, a.vcpu);
        let slot = self.slot(a.port)?;
        let priority = slot.binding().priority;
        slot.publish(Binding::new(state, a.vcpu).with_priority(priority));
        Ok(())
    }

    /// EVTCHNOP_close. On FIFO it gives the guest a short while to unlink the port
    /// (`fifo_close`).
    pub(super) fn close_port(&self, t: &mut Table, port: u32) -> Result<(), XenError> {
        self.close_port_waiting(t, port, true)
    }

    fn close_port_waiting(&self, t: &mut Table, port: u32, wait: bool) -> Result<(), XenError> {
        match t.state(port) {
            PortState::Closed => return Err(XenError::Invalid),
            PortState::Virq(v) => {
                for vcpu in 0..self.config.vcpus {
                    let entry = &self.virqs[(vcpu * NR_VIRQS + v) as usize];
                    if entry.load(Ordering::Acquire) == port {
                        entry.store(0, Ordering::Release);
                    }
                }
            }
            // Xen: the other end of a loopback pair becomes unbound, waiting for us again.
            PortState::Interdomain {
                remote: Remote::Guest,
                remote_port,
            } => {
                let remote = Remote::Guest;
                let peer = PortState::Interdomain {
                    remote,
                    remote_port: port,
                };
                if t.state(remote_port) == peer {
                    self.set_state(t, remote_port, PortState::Unbound { remote });
                }
            }
            // QEMU: the backend endpoint stays open, unconnected.
            PortState::Interdomain {
                remote: Remote::Backend,
                remote_port,
            } => {
                if let Some(Some(slot)) = t.backends.get_mut(remote_port as usize) {
                    if slot.guest_port == port {
                        slot.guest_port = 0;
                    }
                }
            }
            // The PIRQ keeps its allocation (Xen: unmapping is PHYSDEVOP_unmap_pirq's).
            PortState::Pirq(pirq) => {
                if let Some(p) = self.pirq_ports.get(pirq as usize) {
                    let _ = p.compare_exchange(port, 0, Ordering::AcqRel, Ordering::Acquire);
                }
            }
            PortState::Unbound { .. }
            | PortState::Interdomain {
                remote: Remote::Domain(_),
                ..
            }
            | PortState::Ipi => {}
        }
        let slot = self.slot(port)?;
        slot.begin_close();
        let ops = self.port_ops();
        ops.clear_pending(self, port);
        if self.is_fifo() {
            self.fifo_close(port, wait);
        }
        t.set(port, PortState::Closed, 0);
        slot.finish_close();
        Ok(())
    }

    /// Closes every port. Every caller then leaves FIFO (reset), which forgets the queues:
    /// no close waits for an unlink (a guest with 2^17 linked ports would hold the table
    /// mutex for seconds).
    pub(super) fn close_all(&self, t: &mut Table) {
        let open: Vec<u32> = t.open().map(|(p, _, _)| p).collect();
        for port in open {
            let _ = self.close_port_waiting(t, port, false);
        }
    }
}
