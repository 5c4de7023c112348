//! Snapshots: the state of a VM's interrupts as plain, versioned, serde-serializable data, for
//! pause-save-restore-resume and live migration.
//!
//! A [`Snapshot`] holds the core's state ([`CoreState`]: GSI allocations, routes, the userspace
//! IOAPIC) and the objects the VMM holds, each saved under a name the VMM chooses
//! ([`Snapshot::insert`]), never by descriptor number. [`crate::Interrupts::restore`] builds a
//! fresh VM's interrupts from it, paused; the VMM takes each object back by its name with its
//! own (new) eventfds, then resumes. Signals that waited unserved at save are delivered at
//! [`crate::Interrupts::resume`], once.
//!
//! Guest-memory state (Xen `shared_info`, `vcpu_info`) travels with guest RAM and is not
//! duplicated here; in-kernel irqchip and LAPIC state is the backend's and the vCPUs'.
//!
//! [`Snapshot::to_bytes`] gives a self-checking encoding (magic, version, length, checksum,
//! JSON body); [`Snapshot::from_bytes`] refuses a truncated, corrupted or newer one with a
//! typed error. A VMM may instead embed a `Snapshot` in its own serde format:
//! [`crate::Interrupts::restore`] checks the version and every value again.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::backend::IrqchipMode;
use crate::ioapic::IoapicState;
use crate::route::{Gsi, Route};

/// The snapshot format this vmirq writes. Older ones are restored (migrated on load).
pub const VERSION: u32 = 1;

/// First bytes of [`Snapshot::to_bytes`].
pub const MAGIC: [u8; 8] = *b"vmirq-sn";

/// Bytes before the JSON body: magic, version (u32), body length (u64), FNV-1a of the body.
const HEADER: usize = 8 + 4 + 8 + 8;

/// Why a snapshot cannot be taken or restored. A refused restore leaves the target untouched.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes end before the snapshot does.
    #[error("the snapshot is truncated: {got} bytes of {needed}")]
    Truncated {
        /// Bytes the header says there are.
        needed: u64,
        /// Bytes there are.
        got: u64,
    },
    /// The bytes are not a vmirq snapshot.
    #[error("not a vmirq snapshot (bad magic)")]
    NotASnapshot,
    /// The bytes changed after they were written (checksum), or the body does not parse.
    #[error("the snapshot is corrupted: {0}")]
    Corrupted(String),
    /// Written by a newer vmirq.
    #[error("snapshot version {found} is newer than this vmirq reads (up to {supported})")]
    UnknownVersion {
        /// The snapshot's version.
        found: u32,
        /// [`VERSION`].
        supported: u32,
    },
    /// The snapshot was taken in another irqchip mode than the target VM's.
    #[error("the snapshot's irqchip mode is {saved:?}, the target VM's is {target:?}")]
    ModeMismatch {
        /// The snapshot's mode.
        saved: IrqchipMode,
        /// The target's mode.
        target: IrqchipMode,
    },
    /// The snapshot names a GSI the target VM's allocator does not hand out.
    #[error("the snapshot leases {gsi}, outside the target VM's GSIs {first}..{limit}")]
    GsiOutOfRange {
        /// The GSI.
        gsi: Gsi,
        /// The target's first dynamic GSI.
        first: u32,
        /// The target's GSI limit.
        limit: u32,
    },
    /// A value no VM can hold (named in the message).
    #[error("the snapshot holds an impossible state: {0}")]
    Invalid(String),
    /// No object was saved under this name, or it was already taken back.
    #[error("no object named {0:?} in the snapshot (or it was already restored)")]
    NoSuchObject(String),
    /// The object saved under this name is of another kind or for another GSI.
    #[error("the object named {key:?} is {found}, not {wanted}")]
    WrongObject {
        /// The name.
        key: String,
        /// What was saved.
        found: String,
        /// What the caller restores.
        wanted: String,
    },
    /// A saved irqfd is restored as another kind, or on another GSI.
    #[error("the saved irqfd is {saved}; it is being restored as {target}")]
    IrqfdMismatch {
        /// What was saved.
        saved: String,
        /// What the caller restores.
        target: String,
    },
    /// [`crate::Restored::finish`] with objects not taken back.
    #[error("objects not restored: {}", .0.join(", "))]
    NotRestored(Vec<String>),
    /// Two objects saved under one name.
    #[error("an object named {0:?} is already in the snapshot")]
    DuplicateObject(String),
    /// `save` needs the userspace path paused, so nothing changes under it.
    #[error("pause the VM's interrupts before saving them")]
    NotPaused,
}

/// Everything vmirq owns for one VM, as plain data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// The format version ([`VERSION`] when written by this vmirq).
    pub version: u32,
    /// The core: GSI allocations, routes, the userspace IOAPIC.
    pub core: CoreState,
    /// The VMM's objects, by the names it chose.
    pub objects: BTreeMap<String, ObjectState>,
}

/// The core's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreState {
    /// Where the irqchip lives; a snapshot restores only into the same mode.
    pub mode: IrqchipMode,
    /// GSIs leased to routes, lowest first.
    pub allocated: Vec<Gsi>,
    /// The routes of the leased GSIs (pins' GSIs have fixed routes, not saved).
    pub routes: Vec<(Gsi, Vec<Route>)>,
    /// The userspace IOAPIC (split irqchip only).
    pub ioapic: Option<IoapicState>,
    /// The hypervisor's in-kernel IOAPIC and PICs (kernel irqchip only).
    #[serde(default)]
    pub kernel_irqchip: Option<crate::backend::KernelIrqchip>,
    /// Level lines a source held high: the level the irqchip has from each.
    #[serde(default)]
    pub lines: Vec<Gsi>,
}

/// One object the VMM holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum ObjectState {
    /// A [`crate::GsiRoute`]: its GSI (its routes are in [`CoreState::routes`]).
    Route {
        /// The GSI.
        gsi: Gsi,
    },
    /// An [`crate::EdgeIrqfd`] or [`crate::LevelIrqfd`].
    Irqfd(IrqfdState),
    /// An [`crate::msix::MsixVectors`] device.
    Msix(crate::msix::MsixState),
    /// An [`crate::msix::MsiVectors`] device.
    Msi(crate::msix::MsiState),
    /// An [`crate::InterruptGroup`].
    Group(crate::group::GroupState),
    /// Emulated Xen event channels and their upcalls ([`crate::xen::EventChannels::save`]).
    Xen(crate::xen::XenState),
    /// An [`crate::IrqSource`] on a level line.
    Source(SourceState),
}

/// A level source: its line's GSI, and whether it asserted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceState {
    /// The line's GSI.
    pub gsi: Gsi,
    /// Whether the source asserted its line.
    pub asserted: bool,
}

impl ObjectState {
    fn kind(&self) -> String {
        match self {
            ObjectState::Route { gsi } => format!("the route of {gsi}"),
            ObjectState::Irqfd(s) if s.level => format!("a level irqfd on {}", s.gsi),
            ObjectState::Irqfd(s) => format!("an edge irqfd on {}", s.gsi),
            ObjectState::Msix(s) => format!("MSI-X vectors ({})", s.vectors.len()),
            ObjectState::Msi(_) => "MSI vectors".to_owned(),
            ObjectState::Group(g) => format!("an interrupt group ({})", g.sources.len()),
            ObjectState::Xen(_) => "Xen event channels".to_owned(),
            ObjectState::Source(s) => format!("a source on the line of {}", s.gsi),
        }
    }
}

/// An irqfd: where it injects, and whether a signal waited in its eventfd, unserved, when it
/// was saved (delivered at resume after restore).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IrqfdState {
    /// The GSI it injects on.
    pub gsi: Gsi,
    /// A level irqfd (with a resamplefd).
    pub level: bool,
    /// A signal waited unserved.
    pub pending: bool,
}

/// Something the VMM holds that saves into a snapshot.
pub trait Save {
    /// Its state now.
    fn save(&self) -> ObjectState;
}

impl Snapshot {
    /// Adds `object`'s state under `key` (a name of the VMM's choosing, such as "net0/irq").
    pub fn insert(
        &mut self,
        key: impl Into<String>,
        object: &dyn Save,
    ) -> Result<(), SnapshotError> {
        let key = key.into();
        if self.objects.contains_key(&key) {
            return Err(SnapshotError::DuplicateObject(key));
        }
        self.objects.insert(key, object.save());
        Ok(())
    }

    /// Adds a state saved by other means (such as [`crate::xen::EventChannels::save`]) under
    /// `key`.
    pub fn insert_state(
        &mut self,
        key: impl Into<String>,
        state: ObjectState,
    ) -> Result<(), SnapshotError> {
        let key = key.into();
        if self.objects.contains_key(&key) {
            return Err(SnapshotError::DuplicateObject(key));
        }
        self.objects.insert(key, state);
        Ok(())
    }

    /// The self-checking encoding: magic, version, body length and checksum, then the body
    /// as JSON.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Plain data with string keys: serializing it cannot fail.
        let body = serde_json::to_vec(self).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&fnv1a(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes [`Snapshot::to_bytes`], refusing truncated, corrupted or newer snapshots, and
    /// migrating older ones to [`VERSION`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, SnapshotError> {
        let truncated = |needed: u64| SnapshotError::Truncated {
            needed,
            got: bytes.len() as u64,
        };
        if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
            return Err(if MAGIC.starts_with(bytes) {
                truncated(HEADER as u64)
            } else {
                SnapshotError::NotASnapshot
            });
        }
        let header = bytes.get(..HEADER).ok_or(truncated(HEADER as u64))?;
        let field = |at: usize, len: usize| {
            let mut b = [0u8; 8];
            b[..len].copy_from_slice(&header[at..at + len]);
            u64::from_le_bytes(b)
        };
        let version = field(8, 4) as u32;
        let len = field(12, 8);
        let sum = field(20, 8);
        check_version(version)?;
        let body = &bytes[HEADER..];
        if (body.len() as u64) < len {
            return Err(truncated(HEADER as u64 + len));
        }
        if body.len() as u64 > len {
            return Err(SnapshotError::Corrupted(format!(
                "{} bytes after the end",
                body.len() as u64 - len
            )));
        }
        if fnv1a(body) != sum {
            return Err(SnapshotError::Corrupted("checksum mismatch".into()));
        }
        let snapshot: Snapshot = serde_json::from_slice(body)
            .map_err(|e| SnapshotError::Corrupted(format!("body: {e}")))?;
        if snapshot.version != version {
            return Err(SnapshotError::Corrupted(format!(
                "header says version {version}, body {}",
                snapshot.version
            )));
        }
        snapshot.migrate()
    }

    /// This snapshot in the current format; refuses a newer one.
    pub fn migrate(self) -> Result<Self, SnapshotError> {
        check_version(self.version)?;
        // Version 1 is the first format: nothing older to convert yet.
        Ok(self)
    }
}

fn check_version(version: u32) -> Result<(), SnapshotError> {
    if version == 0 || version > VERSION {
        return Err(SnapshotError::UnknownVersion {
            found: version,
            supported: VERSION,
        });
    }
    Ok(())
}

/// FNV-1a, 64-bit: detects accidental corruption (not tampering).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether `fd` has a count nobody read (without reading it).
pub(crate) fn has_count(fd: &impl AsRawFd) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: polls one descriptor the caller owns, described by a local pollfd; no wait.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

/// A snapshot's objects, taken back one by one by name while a VM is restored.
#[derive(Debug, Default)]
pub(crate) struct Objects(std::sync::Mutex<BTreeMap<String, ObjectState>>);

impl Objects {
    pub(crate) fn new(objects: BTreeMap<String, ObjectState>) -> Self {
        Self(std::sync::Mutex::new(objects))
    }

    /// Takes the object named `key`, if `accept` says it is the wanted kind (`wanted` names it).
    pub(crate) fn take<T>(
        &self,
        key: &str,
        wanted: &str,
        accept: impl FnOnce(&ObjectState) -> Option<T>,
    ) -> Result<T, SnapshotError> {
        let mut objects = crate::router::lock(&self.0);
        let state = objects
            .get(key)
            .ok_or_else(|| SnapshotError::NoSuchObject(key.to_owned()))?;
        let taken = accept(state).ok_or_else(|| SnapshotError::WrongObject {
            key: key.to_owned(),
            found: state.kind(),
            wanted: wanted.to_owned(),
        })?;
        objects.remove(key);
        Ok(taken)
    }

    /// Names not taken back.
    pub(crate) fn left(&self) -> Vec<String> {
        crate::router::lock(&self.0).keys().cloned().collect()
    }
}
