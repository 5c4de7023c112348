//! A device-facing interrupt group, for device models that keep their own capability model
//! (Cloud Hypervisor's `InterruptSourceGroup` shape): `trigger(i)`, `notifier(i)`,
//! `update(i, config, masked)`, `enable` / `disable`.
//!
//! Each source has an eventfd (its notifier, which a vhost-user backend or VFIO may write
//! directly) and, once configured, a [`GsiRoute`]. Masking keeps the route and unbinds the
//! irqfd: signals keep counting in the eventfd, and unmasking binds it again, which delivers
//! what counted meanwhile once (KVM polls an irqfd's eventfd at assign; vmirq's dispatcher
//! sees the count at once). Nothing is lost while masked or disabled.
//!
//! Locks: one mutex per source, held while that source is reconfigured (routes commit, irqfd
//! binds); `trigger` takes none.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::gsi::GsiRoute;
use crate::interrupts::{Error, Interrupts};
use crate::irqfd::{duplicate, eventfd_id, EdgeIrqfd, EventfdId};
use crate::msi::MsiMessage;
use crate::route::Route;
use crate::router::lock;

/// Where one source of a group goes (Cloud Hypervisor's `InterruptSourceConfig`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum InterruptSourceConfig {
    /// An MSI message.
    Msi {
        /// Address and data.
        msg: MsiMessage,
        /// Requester ID, if the platform needs one.
        devid: Option<u32>,
    },
    /// An IOAPIC pin (edge: each trigger is one edge on the pin).
    Pin(u32),
}

impl InterruptSourceConfig {
    fn route(self) -> Route {
        match self {
            InterruptSourceConfig::Msi { msg, devid } => Route::Msi { msg, devid },
            InterruptSourceConfig::Pin(pin) => Route::ioapic(pin),
        }
    }
}

#[derive(Default)]
struct State {
    /// Present exactly while the source is configured, unmasked and the group enabled.
    irqfd: Option<EdgeIrqfd>,
    route: Option<GsiRoute>,
    config: Option<InterruptSourceConfig>,
    masked: bool,
}

struct Source {
    notifier: EventFd,
    id: EventfdId,
    state: Mutex<State>,
}

/// A group of interrupt sources of one device. See the module docs.
///
/// ```
/// use vmirq::{InterruptGroup, InterruptSourceConfig, Interrupts, IrqchipMode, SimBackend, X86Msi};
///
/// let sim = SimBackend::new(1, IrqchipMode::Kernel);
/// let irq = Interrupts::new(sim.clone(), Default::default())?;
/// let group = InterruptGroup::new(&irq, 4)?;
/// let msg = X86Msi::fixed(0, 0x50).encode()?;
/// group.update(2, InterruptSourceConfig::Msi { msg, devid: None }, true)?;   // masked
/// group.enable()?;
/// group.trigger(2)?;                    // counted, not delivered
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x50), 0);
/// group.update(2, InterruptSourceConfig::Msi { msg, devid: None }, false)?;  // unmask
/// sim.run_until_idle();
/// assert_eq!(sim.count(0, 0x50), 1);    // the masked trigger, once
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct InterruptGroup {
    interrupts: Arc<Interrupts>,
    sources: Box<[Source]>,
    enabled: Mutex<bool>,
}

impl InterruptGroup {
    /// A group of `count` sources, each with its eventfd; nothing routed, disabled.
    pub fn new(interrupts: &Arc<Interrupts>, count: usize) -> Result<Self, Error> {
        let sources = (0..count)
            .map(|_| {
                let notifier = EventFd::new(EFD_NONBLOCK).map_err(|e| {
                    if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) {
                        Error::FdExhausted(e)
                    } else {
                        Error::Dispatcher(e)
                    }
                })?;
                let id = eventfd_id(std::os::fd::AsRawFd::as_raw_fd(&notifier))?;
                Ok(Source {
                    notifier,
                    id,
                    state: Mutex::new(State {
                        masked: true,
                        ..State::default()
                    }),
                })
            })
            .collect::<Result<_, Error>>()?;
        Ok(Self {
            interrupts: Arc::clone(interrupts),
            sources,
            enabled: Mutex::new(false),
        })
    }

    /// Sources in the group.
    pub fn len(&self) -> usize {
        self.sources.len()
    }

    /// Whether the group has no source.
    pub fn is_empty(&self) -> bool {
        self.sources.is_empty()
    }

    fn source(&self, index: usize) -> Result<&Source, Error> {
        self.sources.get(index).ok_or(Error::Unsupported(
            "trigger a source the group does not have",
        ))
    }

    /// Raises source `index` (its eventfd counts; lock-free).
    pub fn trigger(&self, index: usize) -> Result<(), Error> {
        self.source(index)?
            .notifier
            .write(1)
            .map_err(Error::Dispatcher)
    }

    /// A handle on source `index`'s eventfd, for a producer in another thread or process.
    pub fn notifier(&self, index: usize) -> Option<EventFd> {
        self.sources
            .get(index)
            .and_then(|s| duplicate(&s.notifier).ok())
    }

    /// Configures source `index`: its route (allocated on first use, changed in one commit)
    /// and whether it is masked. Unmasking (with the group enabled) binds the irqfd, which
    /// delivers anything counted while masked, once.
    pub fn update(
        &self,
        index: usize,
        config: InterruptSourceConfig,
        masked: bool,
    ) -> Result<(), Error> {
        let source = self.source(index)?;
        let enabled = *lock(&self.enabled);
        let mut st = lock(&source.state);
        // Masking: the irqfd goes before the route changes (Cloud Hypervisor #3827).
        if masked || st.config != Some(config) {
            st.irqfd = None;
        }
        if st.config != Some(config) {
            match &st.route {
                Some(route) => route.set(config.route())?,
                None => st.route = Some(self.interrupts.new_route(config.route())?),
            }
            st.config = Some(config);
        }
        st.masked = masked;
        if enabled {
            Self::bind(source, &mut st)?;
        }
        Ok(())
    }

    /// Binds every configured, unmasked source.
    pub fn enable(&self) -> Result<(), Error> {
        let mut enabled = lock(&self.enabled);
        *enabled = true;
        for source in self.sources.iter() {
            Self::bind(source, &mut lock(&source.state))?;
        }
        Ok(())
    }

    /// Unbinds every source; routes stay and triggers keep counting.
    pub fn disable(&self) -> Result<(), Error> {
        let mut enabled = lock(&self.enabled);
        *enabled = false;
        for source in self.sources.iter() {
            lock(&source.state).irqfd = None;
        }
        Ok(())
    }

    /// Which path source `index` is delivered on now (`None` while unbound).
    pub fn path(&self, index: usize) -> Option<crate::IrqfdPath> {
        let source = self.sources.get(index)?;
        lock(&source.state).irqfd.as_ref().map(EdgeIrqfd::path)
    }

    fn bind(source: &Source, st: &mut State) -> Result<(), Error> {
        if st.masked || st.irqfd.is_some() {
            return Ok(());
        }
        if let Some(route) = &st.route {
            st.irqfd = Some(route.assign_known(&source.notifier, source.id)?);
        }
        Ok(())
    }
}

/// An [`InterruptGroup`] in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupState {
    /// Whether the group was enabled.
    pub enabled: bool,
    /// Per source, source 0 first.
    pub sources: Vec<GroupSourceState>,
}

/// One source of a group in a snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GroupSourceState {
    /// Its configuration, once updated.
    pub config: Option<InterruptSourceConfig>,
    /// Masked by the device's capability model.
    pub masked: bool,
    /// The GSI it holds (its route is in the core's state).
    pub gsi: Option<crate::route::Gsi>,
    /// Its notifier held a count nobody injected (masked, disabled, or a paused user path).
    pub pending: bool,
}

impl crate::snapshot::Save for InterruptGroup {
    fn save(&self) -> crate::snapshot::ObjectState {
        let Self {
            interrupts: _,
            sources,
            enabled,
        } = self;
        let enabled = *lock(enabled);
        let sources = sources
            .iter()
            .map(|source| {
                let Source {
                    notifier,
                    id: _,
                    state,
                } = source;
                let st = lock(state);
                let State {
                    irqfd: _,
                    route,
                    config,
                    masked,
                } = &*st;
                GroupSourceState {
                    config: *config,
                    masked: *masked,
                    gsi: route.as_ref().map(GsiRoute::gsi),
                    pending: crate::snapshot::has_count(notifier),
                }
            })
            .collect();
        crate::snapshot::ObjectState::Group(GroupState { enabled, sources })
    }
}

impl InterruptGroup {
    /// The group `state` saved, on the interrupts of a VM being restored (see
    /// [`crate::Restored::group`]): `notifiers` are the producers' eventfds to take over (an
    /// in-process migration), else new ones; each source's GSI taken back through `lease`;
    /// deliverable sources bound. A count that waited is given to the new notifier: at
    /// [`Interrupts::resume`] for a deliverable source, at once for one that waits anyway.
    pub(crate) fn restore(
        interrupts: &Arc<Interrupts>,
        state: &GroupState,
        notifiers: Option<Vec<EventFd>>,
        mut lease: impl FnMut(crate::route::Gsi) -> Result<GsiRoute, Error>,
    ) -> Result<Self, Error> {
        let invalid = |what: String| {
            Error::from(crate::snapshot::SnapshotError::Invalid(format!(
                "interrupt group: {what}"
            )))
        };
        let mut group = Self::new(interrupts, state.sources.len())?;
        if let Some(fds) = notifiers {
            if fds.len() != group.sources.len() {
                return Err(invalid(format!(
                    "{} notifiers for {} sources",
                    fds.len(),
                    group.sources.len()
                )));
            }
            for (source, fd) in group.sources.iter_mut().zip(fds) {
                source.id = eventfd_id(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                source.notifier = fd;
            }
        }
        *lock(&group.enabled) = state.enabled;
        for (source, saved) in group.sources.iter().zip(&state.sources) {
            let mut st = lock(&source.state);
            st.config = saved.config;
            st.masked = saved.masked;
            if let Some(gsi) = saved.gsi {
                let route = lease(gsi)?;
                let expected = saved.config.map(InterruptSourceConfig::route);
                if route.routes().first().copied() != expected {
                    return Err(invalid(format!("{gsi}'s route is not its source's config")));
                }
                st.route = Some(route);
            }
            if saved.pending && !crate::snapshot::has_count(&source.notifier) {
                let deliverable = state.enabled && !saved.masked && st.route.is_some();
                if deliverable {
                    interrupts.signal_at_resume(&source.notifier)?;
                } else {
                    source.notifier.write(1).map_err(|_| Error::BadEventFd)?;
                }
            }
            if state.enabled {
                Self::bind(source, &mut st)?;
            }
        }
        Ok(group)
    }
}

impl Drop for InterruptGroup {
    /// Unbinds every source, then releases all their routes in one commit.
    fn drop(&mut self) {
        let routes: Vec<GsiRoute> = self
            .sources
            .iter_mut()
            .filter_map(|s| {
                let st = s.state.get_mut().unwrap_or_else(|e| e.into_inner());
                st.irqfd = None;
                st.route.take()
            })
            .collect();
        if let Err(e) = self.interrupts.release_routes(routes) {
            tracing::warn!("interrupt group: releasing routes failed: {e}");
        }
    }
}
