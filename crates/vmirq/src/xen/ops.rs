//! The `EVTCHNOP_*` operations (Xen xen/common/event_channel.c; QEMU hw/i386/kvm/xen_evtchn.c
//! where Xen-on-KVM differs). Each runs with the table mutex held and argument structs already
//! read from guest memory.

use std::sync::atomic::Ordering;

use super::abi::{self, virq_is_global, NR_VIRQS};
use super::ports::{Binding, Table};
use super::{EventChannels, PortState, Remote, XenError, DOMID_BACKEND};

impl EventChannels {
    pub(super) fn alloc_unbound(
        &self,
        t: &mut Table,
        a: &mut abi::AllocUnbound,
    ) -> Result<(), XenError> {
        self.check_dom(a.dom)?;
        // QEMU: only loopback or the VMM's backends are reachable; other domains -EPERM.
        let remote = if a.remote_dom == DOMID_BACKEND {
            Remote::Backend
        } else if self.is_self(a.remote_dom) {
            Remote::Guest
        } else {
            return Err(XenError::Permission);
        };
        a.port = self.alloc(t, PortState::Unbound { remote }, 0)?;
        Ok(())
    }

    /// Checks the remote end before allocating, so a failed bind leaves no trace; -ENOSPC is
    /// therefore reported only for an otherwise valid bind (Xen allocates first).
    pub(super) fn bind_interdomain(
        &self,
        t: &mut Table,
        a: &mut abi::BindInterdomain,
    ) -> Result<(), XenError> {
        let rp = a.remote_port;
        let lp = if a.remote_dom == DOMID_BACKEND {
            // QEMU: the backend port must exist (-ENOENT) and be unconnected (-EBUSY).
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
        } else if self.is_self(a.remote_dom) {
            // Xen: the remote port must be unbound and waiting for this domain.
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
        } else {
            return Err(XenError::NoSuchDomain);
        };
        a.local_port = lp;
        // Xen: "We may have lost notifications on the remote unbound port. Fix that up here by
        // conservatively always setting a notification on the local port."
        let _ = self.deliver(lp);
        Ok(())
    }

    pub(super) fn bind_virq(&self, t: &mut Table, a: &mut abi::BindVirq) -> Result<(), XenError> {
        // Xen's order: range, global-on-vCPU-0, vCPU, already bound.
        if a.virq >= NR_VIRQS || (virq_is_global(a.virq) && a.vcpu != 0) {
            return Err(XenError::Invalid);
        }
        if a.vcpu >= self.config.vcpus {
            return Err(XenError::NoEntry);
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
            // Xen: "silently drop the notification".
            PortState::Unbound { .. } => {}
            // Xen: VIRQ and PIRQ ports are Xen's to send on; closed ports are invalid.
            PortState::Closed | PortState::Virq(_) | PortState::Pirq(_) => {
                return Err(XenError::Invalid)
            }
        }
        Ok(())
    }

    /// Fills the OUT fields Xen sets for the state and leaves the rest of the struct as the
    /// guest wrote it (Xen copies the whole struct back).
    pub(super) fn status(&self, t: &Table, a: &mut abi::Status) -> Result<(), XenError> {
        self.check_dom(a.dom)?;
        self.check_port(a.port)?;
        let state = t.state(a.port);
        a.status = state.stat();
        a.vcpu = t.vcpu(a.port);
        let dom = |remote| match remote {
            Remote::Guest => self.config.domid,
            Remote::Backend => DOMID_BACKEND,
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
        let state = t.state(a.port);
        t.ports[a.port as usize].1 = a.vcpu;
        self.slots[a.port as usize].publish(Binding::new(state, a.vcpu));
        // QEMU: re-raise a pending, unmasked event on the new vCPU so the move loses nothing.
        self.unmask_bits(a.port, a.vcpu, false);
        Ok(())
    }

    pub(super) fn close_port(&self, t: &mut Table, port: u32) -> Result<(), XenError> {
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
            PortState::Unbound { .. } | PortState::Pirq(_) | PortState::Ipi => {}
        }
        let slot = self.slot(port)?;
        slot.begin_close();
        let _ = self.shared().clear_pending(port);
        t.ports[port as usize] = (PortState::Closed, 0);
        slot.finish_close();
        Ok(())
    }

    pub(super) fn close_all(&self, t: &mut Table) {
        for port in 1..self.layout.ports {
            if t.state(port) != PortState::Closed {
                let _ = self.close_port(t, port);
            }
        }
    }
}
