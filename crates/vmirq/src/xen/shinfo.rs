//! shared_info moves and the ABI width switches while events are being sent.
//!
//! Moving (Xen `XENMAPSPACE_shared_info` at a new frame, at resume or kexec):
//! 1. copy the old page to the new one;
//! 2. publish the new address;
//! 3. quiesce every port: wait until no delivery holds it. A delivery loads the address after
//!    taking its port's hold (both SeqCst), so one that started after step 2 uses the new page,
//!    and one that started before has finished when its port is seen free;
//! 4. OR into the new page the pending, selector and `upcall_pending` bits set on the old one
//!    since the copy, and raise the upcalls that sets.
//!
//! Nothing is lost; a bit the guest cleared on the old page in that window comes back as a
//! spurious event, which guests tolerate. The width switch (KVM's `KVM_XEN_ATTR_TYPE_LONG_MODE`)
//! publishes the new width and quiesces the same way; like KVM, it does not translate bits
//! already set. Both run under the table mutex, so hypercalls see one layout throughout.

use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::layout::{Layout, SharedInfo, LEGACY_MAX_VCPUS};
use super::{EventChannels, XenError};

const PAGE: u64 = 0x1000;

impl EventChannels {
    /// Moves shared_info to the page at guest physical `gpa` (page-aligned, in guest RAM:
    /// else -EINVAL), carrying pending, mask and selector state, while events are sent.
    pub fn move_shared_info(&self, gpa: u64) -> Result<(), XenError> {
        if gpa % PAGE != 0
            || self
                .memory
                .get_slice(GuestAddress(gpa), PAGE as usize)
                .is_err()
        {
            return Err(XenError::Invalid);
        }
        let t = self.lock();
        let old = self.shared_info_gpa.load(Ordering::SeqCst);
        if old == gpa {
            return Ok(());
        }
        let mut page = [0u8; PAGE as usize];
        // An old page outside RAM had nothing to carry.
        if self.memory.read_slice(&mut page, GuestAddress(old)).is_ok() {
            self.memory
                .write_slice(&page, GuestAddress(gpa))
                .map_err(|_| XenError::Invalid)?;
        }
        self.shared_info_gpa.store(gpa, Ordering::SeqCst);
        self.quiesce();
        let layout = self.layout();
        let from = SharedInfo::new(&self.memory, old, layout, &self.placed);
        let raised = self
            .shared()
            .merge_from(&from, self.config.vcpus.min(LEGACY_MAX_VCPUS))
            .unwrap_or_default();
        drop(t);
        tracing::debug!(old, gpa, "Xen shared_info moved");
        for vcpu in raised {
            self.poll_kick(vcpu);
            self.upcall.upcall(vcpu);
        }
        Ok(())
    }

    /// Switches the ABI width (64-bit or compat), as KVM's `KVM_XEN_ATTR_TYPE_LONG_MODE`:
    /// bits already set are not translated. Going compat while a port from 1024 on is open is
    /// -EBUSY.
    pub fn set_long_mode(&self, long_mode: bool) -> Result<(), XenError> {
        let t = self.lock();
        let compat_ports = Layout::COMPAT.ports as usize;
        if !long_mode && !self.is_fifo() && t.open().any(|(p, _, _)| p as usize >= compat_ports) {
            return Err(XenError::Busy);
        }
        self.long_mode.store(long_mode, Ordering::SeqCst);
        self.quiesce();
        drop(t);
        Ok(())
    }
}
