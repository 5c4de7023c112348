//! How a Xen guest's upcalls reach it, and the glue between [`EventChannels`] and the core.
//!
//! A vCPU's upcall goes to its per-vCPU vector (HVMOP_set_evtchn_upcall_vector) if it has one,
//! else to the domain's callback (HVM_PARAM_CALLBACK_IRQ): a global vector delivered to that
//! vCPU, or a callback GSI. The GSI is level and belongs to vCPU 0 (Xen: only vCPU 0's
//! upcall_pending drives it): it is a level irqfd with a resamplefd, asserted when vCPU 0's
//! upcall_pending goes up; at each EOI the line drops, and vmirq asserts it again if
//! upcall_pending is still set — so it stays asserted exactly while the guest has not cleared
//! it (QEMU xen_evtchn.c does the same check at EOI). Works on both irqchip modes.
//!
//! Setting a vector or the callback injects at once, as Xen's `hvm_assert_evtchn_irq` does at
//! the end of `hvmop_set_evtchn_upcall_vector` and `hvm_set_callback_via`: Linux registers its
//! `vcpu_info` (which sets `upcall_pending`) before it sets the vector, and would otherwise never
//! get another upcall. Restoring a snapshot configures without injecting.
//!
//! Upcall vectors go to the vCPU's APIC ID, which is the Xen vCPU id unless the VMM maps it
//! ([`Upcalls::set_apic_id`], KVM's `KVM_XEN_VCPU_ATTR_TYPE_VCPU_ID` in reverse).
//!
//! The configuration is read lock-free (`arc-swap`) on every upcall; changing it is rare.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use thiserror::Error;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{EventChannels, UpcallSink, XenError};
use crate::interrupts::{Error, Interrupts, Watch};
use crate::irqfd::LevelIrqfd;
use crate::msi::X86Msi;
use crate::router::lock;

/// Where upcalls go when a vCPU has no per-vCPU vector (HVM_PARAM_CALLBACK_IRQ).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Callback {
    /// Nothing is injected; the guest polls upcall_pending.
    #[default]
    None,
    /// A vector injected into the vCPU whose upcall_pending went up.
    Vector(u8),
    /// A level GSI asserted while vCPU 0's upcall_pending is set: the GSI number the guest
    /// names (HVM_PARAM_CALLBACK_IRQ type 0), an IOAPIC pin.
    Gsi(u32),
}

/// Errors configuring upcalls.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UpcallError {
    /// Xen refuses vectors below 0x10 (EINVAL).
    #[error("upcall vector {0:#x} is below 0x10 (Xen refuses it with EINVAL)")]
    BadVector(u8),
    /// The callback GSI's eventfds could not be created.
    #[error("cannot create the callback GSI's eventfds: {0}")]
    Eventfd(#[source] std::io::Error),
    /// The callback GSI could not be wired.
    #[error("cannot wire the callback GSI: {0}")]
    Gsi(#[from] Error),
    /// No such vCPU.
    #[error("vCPU {0} does not exist")]
    NoSuchVcpu(u32),
}

#[derive(Clone, Default)]
struct Config {
    per_vcpu: Vec<Option<u8>>,
    callback: Callback,
    /// Per Xen vCPU: the APIC ID its upcall vectors are sent to.
    apic_ids: Vec<u32>,
}

/// The callback GSI's level irqfd: its trigger, and the watch on its resamplefd.
/// Field order is drop order: the watch stops before the irqfd unbinds.
struct CallbackGsi {
    _watch: Watch,
    _irqfd: LevelIrqfd,
    trigger: Arc<EventFd>,
    _resample: EventFd,
}

/// Delivers upcalls for [`EventChannels`]. See the module docs.
pub struct Upcalls {
    interrupts: Arc<Interrupts>,
    config: ArcSwap<Config>,
    gsi: Mutex<Option<CallbackGsi>>,
    /// The callback GSI's trigger, for the lock-free upcall path.
    gsi_trigger: ArcSwap<Option<Arc<EventFd>>>,
    channels: OnceLock<Weak<EventChannels>>,
}

impl Upcalls {
    /// Upcalls for a guest with `vcpus` vCPUs, delivered through `interrupts`; none configured.
    pub fn new(interrupts: Arc<Interrupts>, vcpus: u32) -> Arc<Self> {
        Arc::new(Self {
            interrupts,
            config: ArcSwap::from_pointee(Config {
                per_vcpu: vec![None; vcpus as usize],
                callback: Callback::None,
                apic_ids: (0..vcpus).collect(),
            }),
            gsi: Mutex::new(None),
            gsi_trigger: ArcSwap::from_pointee(None),
            channels: OnceLock::new(),
        })
    }

    /// HVMOP_set_evtchn_upcall_vector: `vcpu`'s upcalls go to `vector` (None: back to the
    /// callback). A new vector is injected at once, whatever `upcall_pending` says (Xen
    /// `hvmop_set_evtchn_upcall_vector` → `hvm_assert_evtchn_irq` → `vlapic_set_irq`).
    pub fn set_upcall_vector(&self, vcpu: u32, vector: Option<u8>) -> Result<(), UpcallError> {
        self.configure_vector(vcpu, vector)?;
        if vector.is_some() {
            self.assert_evtchn_irq(vcpu);
        }
        Ok(())
    }

    /// Sets `vcpu`'s upcall vector without injecting anything (restore).
    pub(crate) fn configure_vector(
        &self,
        vcpu: u32,
        vector: Option<u8>,
    ) -> Result<(), UpcallError> {
        if let Some(v) = vector.filter(|v| *v < 0x10) {
            return Err(UpcallError::BadVector(v));
        }
        self.update_vcpu(vcpu, |c, i| c.per_vcpu[i] = vector)
    }

    /// Changes `vcpu`'s entry of the configuration. vCPUs set theirs concurrently (each its
    /// own HVMOP), so the change is a read-copy-update that retries, never a plain store
    /// that could drop another vCPU's.
    fn update_vcpu(&self, vcpu: u32, set: impl Fn(&mut Config, usize)) -> Result<(), UpcallError> {
        let i = vcpu as usize;
        if i >= self.config.load().per_vcpu.len() {
            return Err(UpcallError::NoSuchVcpu(vcpu));
        }
        self.config.rcu(|config| {
            let mut config = Config::clone(config);
            set(&mut config, i);
            config
        });
        Ok(())
    }

    /// Upcall vectors of Xen vCPU `vcpu` go to APIC ID `apic_id` from now on (the identity
    /// until set). Callback GSIs go where the IOAPIC sends them.
    pub fn set_apic_id(&self, vcpu: u32, apic_id: u32) -> Result<(), UpcallError> {
        self.update_vcpu(vcpu, |c, i| c.apic_ids[i] = apic_id)
    }

    /// The APIC ID Xen vCPU `vcpu`'s upcall vectors go to.
    pub fn apic_id(&self, vcpu: u32) -> Option<u32> {
        self.config.load().apic_ids.get(vcpu as usize).copied()
    }

    /// HVM_PARAM_CALLBACK_IRQ: the domain's callback. Then every vCPU's event-channel
    /// interrupt is asserted as Xen's `hvm_set_callback_via` does: a per-vCPU vector is
    /// injected; the callback vector is injected where `upcall_pending` is set; the callback
    /// GSI is asserted if vCPU 0's is.
    pub fn set_callback(self: &Arc<Self>, callback: Callback) -> Result<(), UpcallError> {
        self.configure_callback(callback)?;
        let vcpus = self.config.load().per_vcpu.len() as u32;
        for vcpu in 0..vcpus {
            self.assert_evtchn_irq(vcpu);
        }
        Ok(())
    }

    /// Sets the callback; injects nothing but a callback GSI's assertion while vCPU 0's
    /// `upcall_pending` is set (the level the line must have, also on restore).
    pub(crate) fn configure_callback(
        self: &Arc<Self>,
        callback: Callback,
    ) -> Result<(), UpcallError> {
        if let Callback::Vector(v) = callback {
            if v < 0x10 {
                return Err(UpcallError::BadVector(v));
            }
        }
        let mut gsi = lock(&self.gsi);
        if gsi.take().is_some() {
            self.gsi_trigger.store(Arc::new(None));
        }
        if let Callback::Gsi(g) = callback {
            let wired = self.wire_gsi(g)?;
            self.gsi_trigger
                .store(Arc::new(Some(Arc::clone(&wired.trigger))));
            *gsi = Some(wired);
        }
        self.config.rcu(|config| Config {
            callback,
            ..Config::clone(config)
        });
        drop(gsi);
        // An upcall already pending on vCPU 0 asserts the new GSI at once.
        if let (Callback::Gsi(_), Some(ch)) = (callback, self.channels()) {
            if ch.upcall_pending(0) {
                self.upcall(0);
            }
        }
        Ok(())
    }

    /// Xen `hvm_assert_evtchn_irq` for one vCPU: its vector if it has one; else the callback
    /// vector or (vCPU 0) GSI while `upcall_pending` is set (`hvm_vcpu_has_pending_irq`).
    fn assert_evtchn_irq(&self, vcpu: u32) {
        let has_vector = self
            .config
            .load()
            .per_vcpu
            .get(vcpu as usize)
            .is_some_and(Option::is_some);
        if has_vector || self.channels().is_some_and(|ch| ch.upcall_pending(vcpu)) {
            self.upcall(vcpu);
        }
    }

    fn wire_gsi(self: &Arc<Self>, gsi: u32) -> Result<CallbackGsi, UpcallError> {
        let trigger = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(UpcallError::Eventfd)?);
        let resample = EventFd::new(EFD_NONBLOCK).map_err(UpcallError::Eventfd)?;
        let irqfd = self
            .interrupts
            .pin(gsi)?
            .assign_level_irqfd(&trigger, &resample)?;
        let me = Arc::downgrade(self);
        let again = Arc::clone(&trigger);
        // At each EOI the line dropped: assert it again while vCPU 0 still has an upcall.
        let watch = self.interrupts.watch(
            &resample,
            Arc::new(move || {
                let still = me
                    .upgrade()
                    .and_then(|u| u.channels())
                    .is_some_and(|ch| ch.upcall_pending(0));
                if still {
                    let _ = again.write(1);
                }
            }),
        )?;
        Ok(CallbackGsi {
            _watch: watch,
            _irqfd: irqfd,
            trigger,
            _resample: resample,
        })
    }

    /// The per-vCPU vectors, the callback and the APIC IDs, for a snapshot.
    pub(crate) fn configuration(&self) -> (Vec<Option<u8>>, Callback, Vec<u32>) {
        let config = self.config.load();
        let Config {
            per_vcpu,
            callback,
            apic_ids,
        } = &**config;
        (per_vcpu.clone(), *callback, apic_ids.clone())
    }

    /// The VM's interrupts.
    pub(crate) fn interrupts(&self) -> &Arc<Interrupts> {
        &self.interrupts
    }

    fn channels(&self) -> Option<Arc<EventChannels>> {
        self.channels.get().and_then(Weak::upgrade)
    }

    /// Ties these upcalls to the event channels they serve (once).
    pub(crate) fn bind(&self, channels: &Arc<EventChannels>) {
        let _ = self.channels.set(Arc::downgrade(channels));
    }
}

impl UpcallSink for Upcalls {
    fn upcall(&self, vcpu: u32) {
        let config = self.config.load();
        let vector = match (
            config.per_vcpu.get(vcpu as usize).copied().flatten(),
            config.callback,
        ) {
            (Some(v), _) | (None, Callback::Vector(v)) => Some(v),
            (None, Callback::Gsi(_)) => {
                if vcpu == 0 {
                    if let Some(t) = self.gsi_trigger.load().as_ref() {
                        let _ = t.write(1);
                    }
                }
                None
            }
            (None, Callback::None) => None,
        };
        if let Some(vector) = vector {
            let apic_id = config.apic_ids.get(vcpu as usize).copied().unwrap_or(vcpu);
            let msg = X86Msi::fixed(apic_id, vector).encode();
            if let Err(e) = msg
                .map_err(|e| e.to_string())
                .and_then(|m| self.interrupts.signal_msi(m).map_err(|e| e.to_string()))
            {
                tracing::warn!("Xen upcall to vCPU {vcpu}: {e}");
            }
        }
    }
}

/// Routes of kind [`crate::Route::XenEvtchn`] deliver here: the lock-free 2-level marking.
struct RouteSink(Weak<EventChannels>);

impl crate::EventChannelSink for RouteSink {
    fn set_pending(&self, port: u32, vcpu: u32) -> Result<(), XenError> {
        // Gone channels are closed ports: the event is dropped as Xen drops a send to one.
        let channels = self.0.upgrade().ok_or(XenError::Closed)?;
        channels.set_pending(port, vcpu).map(|_| ())
    }

    fn deliver_pirq_msi(&self, msg: crate::MsiMessage) -> Result<(), XenError> {
        let channels = self.0.upgrade().ok_or(XenError::Closed)?;
        channels.deliver_pirq_msi(msg)
    }

    fn set_gsi_level(&self, gsi: u32, resampled: bool, level: bool) -> bool {
        self.0
            .upgrade()
            .is_some_and(|ch| ch.set_gsi_level(gsi, resampled, level))
    }
}

/// Emulated event channels for a guest, wired to `interrupts`: upcalls go through the returned
/// [`Upcalls`] (configure its vectors / callback), and routes of kind
/// [`crate::Route::XenEvtchn`] mark their ports pending.
pub fn attach(
    interrupts: &Arc<Interrupts>,
    memory: vm_memory::GuestMemoryMmap,
    config: super::XenConfig,
) -> (Arc<EventChannels>, Arc<Upcalls>) {
    let vcpus = config.vcpus.clamp(1, super::layout::MAX_VCPUS);
    let upcalls = Upcalls::new(Arc::clone(interrupts), vcpus);
    let sink: Arc<dyn UpcallSink> = upcalls.clone();
    let channels = Arc::new(EventChannels::new(memory, config, sink));
    upcalls.bind(&channels);
    interrupts.attach_event_channels(Box::new(RouteSink(Arc::downgrade(&channels))));
    (channels, upcalls)
}
